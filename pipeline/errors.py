"""User-facing errors: the CLI prints their message (no traceback) and exits with status 2."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix: bad config, bad input data, a missing or invalid cache entry."""


class ConfigError(PipelineError):
    """A config key is unknown, has the wrong type, or an out-of-range value."""


class DataError(PipelineError):
    """Input data cannot be used; the message names the file, the row and the problem."""


class CacheError(PipelineError):
    """A cache entry is missing, incomplete, corrupt or does not match its key."""
