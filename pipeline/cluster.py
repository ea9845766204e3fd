"""The Ray cluster as the stages see it: joining or starting it, the CPUs each worker or actor gets, and how
errors of ours come back from Ray Data tasks and actors."""

from __future__ import annotations

import os
from typing import Any

import ray

from pipeline.errors import PipelineError


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local Ray."""
    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or None,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
        )


def cluster_cpus() -> int:
    """CPUs in the whole cluster (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cpus_each(configured: int | None, count: int) -> int:
    """CPUs (and torch threads) for each of `count` workers or actors: the configured number, else an equal
    share of the cluster's CPUs."""
    return configured or max(1, cluster_cpus() // count)


def data_context() -> ray.data.DataContext:
    """This driver's Ray Data context, set so that an error raised in a map function comes back as itself
    (RayTaskError(DataError), ...) rather than as Ray Data's UserCodeException, which keeps no cause."""
    ctx = ray.data.DataContext.get_current()
    ctx.raise_original_map_exception = True
    return ctx


class SetupErrorsOnFirstCall:
    """Base for Ray Data actor classes: an error of ours raised while the actor sets up (a model that fails to
    load) is kept and raised by the first call. Raised in `__init__`, Ray would report only the text of it
    (ActorDiedError keeps no cause), and the console would show a traceback instead of our message.

        class _Score(SetupErrorsOnFirstCall):
            def setup(self, model_dir: str) -> None: ...      # instead of __init__
            def process(self, batch): ...                     # instead of __call__
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self.setup_error: PipelineError | None = None
        try:
            self.setup(*args, **kwargs)
        except PipelineError as e:
            self.setup_error = e

    def __call__(self, batch: Any) -> Any:
        if self.setup_error is not None:
            raise self.setup_error
        return self.process(batch)

    def setup(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def process(self, batch: Any) -> Any:
        raise NotImplementedError
