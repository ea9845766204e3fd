"""The Ray cluster as the stages see it: joining or starting it, and the CPUs each worker or actor gets."""

from __future__ import annotations

import os

import ray


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
