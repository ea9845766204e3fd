"""The console of a stage command: the project's own lines; Ray's, DeepSpeed's and the libraries' logs go to a file.

    with open_console(cfg.data.output_dir, "run", verbose=False) as log:   # prints where the log file is
        ...                                                                  # the command

While it is open, on the driver (whether this process starts Ray or joins a cluster, as under `ray job submit`):
- `<output_dir>/logs/pipeline.log` receives what the driver writes below Python (file descriptor 2: the C++ core
  worker's lines), what goes to `sys.stderr` (warnings, tqdm bars, the stderr of Ray's workers, which Ray
  forwards there) and what the logging handlers that write to the process's output emit (Ray's, Ray Data's,
  transformers'): they are pointed at the file meanwhile;
- `sys.stdout` stays the console for the project's lines (a lowercase `[tag] ` first, or the run's `held-out ...`
  summary); any other line goes to the log: what a library prints, or a logging handler made inside the block
  writes, to the stdout of that moment (DeepSpeed's, imported on the driver when save_pretrained converts a
  builtin model, says `[WARNING] [real_accelerator.py:...] Setting accelerator to CPU`). Of the workers' stdout
  that Ray forwards there (`(RayTrainWorker pid=17479) [train] step 2/4 ...`), a project line passes without
  Ray's prefix, and so does an autoscaler warning (a resource request that cannot be scheduled);
- `sys.stdout` says it is not a terminal, so Ray Data logs its progress (into the file, every 10 s) instead of
  drawing bars.
Everything written passes through pipeline.redact. `verbose` keeps today's console: everything on it, no file.
The project's own errors are printed after the block, on the console.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import ray

from pipeline.redact import RedactingStream
from pipeline.uris import is_uri

LOG_FILE = Path("logs") / "pipeline.log"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# a line Ray forwards from a worker: "(<actor or task name> pid=<pid>[, ip=<ip>]) <message>", the prefix in color
FORWARDED = re.compile(
    r"(?:\x1b\[[0-9;]*m)?\((?P<source>.*?(?:pid=\d+|raylet|autoscaler \+\S+)(?:, ip=[^)]*)?)\)(?:\x1b\[[0-9;]*m)? "
    r"(?P<message>.*)",
    re.S,
)
# "[train] ...", "[score-ref] ...", "held-out reward accuracy: ..."; not "[2026-..." nor "[INFO]"
PROJECT_LINE = re.compile(r"\[[a-z][a-z0-9-]*\] |held-out ")


def log_path(output_dir: str) -> Path:
    """`<output_dir>/logs/pipeline.log`; for an output_dir that is a URI, a local file in the temp folder."""
    if is_uri(output_dir):
        return Path(tempfile.gettempdir()) / f"dpo-pipeline-{os.getpid()}.log"
    return Path(output_dir).expanduser() / LOG_FILE


def for_console(line: str) -> str | None:
    """What the console shows of one line written to stdout: the line when it is the project's, a forwarded worker
    line's message when it is the project's (or an autoscaler warning), or None (the line belongs in the log)."""
    forwarded = FORWARDED.fullmatch(line)
    if forwarded is None:
        return line if PROJECT_LINE.match(line) else None
    message = forwarded["message"]
    autoscaler = forwarded["source"].startswith("autoscaler") and ("Warning:" in message or "Error:" in message)
    return message if PROJECT_LINE.match(message) or autoscaler else None


class _ConsoleOut:
    """stdout: the project's lines to the console, every other line to the log. Ray's thread forwarding the
    workers' lines and the main thread write here at once: a line is judged when its newline has come."""

    def __init__(self, console: TextIO, log: RedactingStream):
        self.console, self.log = console, log
        self.pending = ""
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.pending += text
            *lines, self.pending = self.pending.split("\n")
        for line in lines:
            shown = for_console(line)
            if shown is None:
                self.log.write(line + "\n")
            else:
                self.console.write(shown + "\n")
        return len(text)

    def flush(self) -> None:  # an unfinished line waits: it may be a worker's, its newline still to come
        self.console.flush()
        self.log.flush()

    def close(self) -> None:
        """The last line, when the output does not end with a newline."""
        if self.pending:
            self.write("\n")
        self.flush()

    def isatty(self) -> bool:
        return False  # libraries that draw progress bars on a terminal log instead (into the file)

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, ... of the console
        return getattr(self.console, name)


class _LogStream(RedactingStream):
    """The log file as a text stream: redacted, without the color codes of Ray's prefixes. A write that fails
    (a full disk; a late write after the command) is dropped: the log never stops a command."""

    def _emit(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            super()._emit(ANSI.sub("", text))

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().flush()


def _console_handlers() -> list[logging.StreamHandler[Any]]:
    """The logging handlers that write to the process's output (a stream with a file descriptor): Ray's and Ray
    Data's, transformers', DeepSpeed's. Handlers of files and of in-memory buffers (pytest's caplog) are left be."""
    loggers = [logging.root, *(x for x in logging.root.manager.loggerDict.values() if isinstance(x, logging.Logger))]
    return [
        h
        for x in loggers
        for h in x.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and _has_fd(h.stream)
    ]


def _has_fd(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return False
    return True


@contextlib.contextmanager
def open_console(output_dir: str, command: str, verbose: bool = False) -> Iterator[Path | None]:
    """The project's lines on the console, the rest in the log file (module docstring); yields its path, or None
    with `verbose`. Ray started inside the block is shut down at its end, so that its last lines go to the file."""
    if verbose:
        yield None
        return
    path = log_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{command}] Ray's, DeepSpeed's and the libraries' logs: {path} (--verbose shows them here)", flush=True)
    ray_before = ray.is_initialized()
    out, err = sys.stdout, sys.stderr
    file = path.open("a", buffering=1, encoding="utf-8", errors="backslashreplace")
    log = _LogStream(file)
    log.write(f"\n===== dpo-pipeline {command}, {datetime.datetime.now():%Y-%m-%d %H:%M:%S}, pid {os.getpid()}\n")
    for stream in (out, err, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    saved_fd2 = os.dup(2)
    os.dup2(file.fileno(), 2)
    console = _ConsoleOut(out, log)
    sys.stdout, sys.stderr = console, log
    # None: the handler follows sys.stderr (logging.lastResort), or another logger's had it moved already
    handlers = {h: old for h in _console_handlers() if (old := h.setStream(log)) is not None}
    try:
        yield path
    finally:
        try:
            if not ray_before and ray.is_initialized():
                ray.shutdown()
        finally:
            for handler, stream in handlers.items():
                handler.setStream(stream)
            console.close()
            log.flush()
            sys.stdout, sys.stderr = out, err
            os.dup2(saved_fd2, 2)
            os.close(saved_fd2)
            with contextlib.suppress(OSError):  # what a full disk kept in the buffer is lost, not raised
                file.close()
