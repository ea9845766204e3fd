"""User-facing errors: the CLI prints their message (no traceback) and exits with status 2.

Raised anywhere — the driver, a Ray task, a Ray Data actor, a Ray Train worker — they reach the console the
same way: Ray carries the exception back as the cause of its own (RayTaskError, ...), `find_pipeline_error`
finds it in the chain, and the message is the one given here (Ray may append its own lines to an exception's
arguments on the way; `str()` of ours ignores them).
"""

from __future__ import annotations

from typing import Any


class PipelineError(Exception):
    """A problem the user can fix: bad config, bad input data, a missing or invalid cache entry."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(PipelineError):
    """A config key is unknown, has the wrong type, or an out-of-range value."""


class DataError(PipelineError):
    """Input data cannot be used; the message names the file, the row and the problem."""


class CacheError(PipelineError):
    """A cache entry is missing, incomplete, corrupt or does not match its key."""


class ClusterError(PipelineError):
    """The Ray cluster to join cannot be joined: nothing answers at its address, it refuses our token, or it runs
    another Ray or Python."""


def causes(e: BaseException) -> list[BaseException]:
    """`e` and what it wraps: Ray's `cause` attribute, then `__cause__` / `__context__`, each exception once."""
    chain: list[BaseException] = []
    current: Any = e
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    return [c for c in chain if isinstance(c, BaseException)]


def find_pipeline_error(e: BaseException) -> PipelineError | None:
    """The project's own error behind `e`, however deep Ray wrapped it; None when there is none (a bug).
    Ray's wrapper `RayTaskError(DataError)` is an instance of both classes with Ray's text; the error it
    carries as `cause` is the one with our message."""
    wrapped = (
        c
        for c in causes(e)
        if isinstance(c, PipelineError) and not isinstance(getattr(c, "cause", None), BaseException)
    )
    return next(wrapped, None)
