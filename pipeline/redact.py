"""Keep secrets out of what we print and write: tokens, credentials and cloud keys are replaced by `***`.

What counts as a secret: the value of any environment variable whose name has a TOKEN, SECRET, PASSWORD,
PASSWD, KEY or CREDENTIALS part (HF_TOKEN, RAY_AUTH_TOKEN, AWS_SECRET_ACCESS_KEY, WANDB_API_KEY, ...), and
anything shaped like a Hugging Face token (hf_...), an AWS access key id (AKIA.../ASIA...), a private key
block or the `user:password@` part of a URI. The CLI routes its console output through `RedactingStream`
(Ray forwards worker output to that console too), and run summaries go through `redact_value`.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, TextIO

from pipeline.uris import MASK, mask_credentials

SECRET_NAME_PARTS = {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIALS", "APIKEY"}
MIN_SECRET_LENGTH = 8  # shorter values ("1", "true", "token") would mask ordinary words

PATTERNS = (
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),  # Hugging Face user/org tokens
    re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S),
)


NAME_PARTS = re.compile(r"[_\W]+")


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME_PARTS & set(NAME_PARTS.split(name.upper())))


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of secret-named environment variables, longest first (so a value never hides inside another)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if is_secret_name(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    for value in secret_values(environ):
        text = text.replace(value, MASK)
    for pattern in PATTERNS:
        text = pattern.sub(MASK, text)
    return mask_credentials(text)


def redact_value(value: Any) -> Any:
    """`redact` applied to every string inside nested dicts, lists and tuples (e.g. a config or a summary)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value


class RedactingStream:
    """A text stream that redacts each write before passing it on (line-buffered: a secret split across two
    writes of one line is still caught)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        if "\n" in self.pending:
            complete, self.pending = self.pending.rsplit("\n", 1)
            self._emit(complete + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self._emit(self.pending)
            self.pending = ""
        self.stream.flush()

    def _emit(self, text: str) -> None:
        if sys.meta_path is None:  # interpreter teardown (a progress bar's __del__): nothing can be checked
            return
        self.stream.write(redact(text))

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ... of the real stream
        return getattr(self.stream, name)
