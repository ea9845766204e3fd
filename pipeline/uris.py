"""URIs and the credentials they may carry: one place for recognising a URI, refusing one that holds a secret,
and masking the secret when a URI is printed. No I/O (pipeline.cache.storage opens URIs; pipeline.redact masks text).
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import ConfigError

MASK = "***"
# scheme://user@ or scheme://user:password@ (a password may hold '/', which urlsplit would take for the path)
USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]*(?::[^@\s]*)?@")


def is_uri(p: str | os.PathLike[str]) -> bool:
    return "://" in str(p)


def has_credentials(uri: str) -> bool:
    """`user@` or `user:password@` right after the scheme."""
    return USERINFO.match(uri) is not None


def mask_credentials(text: str) -> str:
    """Every `scheme://user:password@` in `text` with its user and password masked."""
    return USERINFO.sub(rf"\1{MASK}@", text)


def check_uri(key: str, value: str | None) -> None:
    """Refuse URIs that carry credentials or options (they would be printed and stored with the path)."""
    if value is None or not is_uri(value):
        return
    parts = urlsplit(value)
    if has_credentials(value):
        raise ConfigError(
            f"{key}: a URI must not contain credentials (user:password@ was given; the value is not "
            "shown). Let the provider's credential chain supply them: environment variables, an "
            "instance role or workload identity."
        )
    if parts.query or parts.fragment:
        raise ConfigError(
            f"{key}={value.split('?')[0]}?...: options in the URI are not supported; configure the "
            "filesystem through its environment variables (e.g. AWS_ENDPOINT_URL, AWS_REGION)."
        )


def redact_uri(uri: str) -> str:
    """A URI fit to print: user, password and query string (where tokens hide) replaced by ***."""
    parts = urlsplit(uri)
    if not parts.netloc and not parts.query:
        return uri
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{MASK}@{host}" if "@" in parts.netloc else host
    return urlunsplit((parts.scheme, netloc, parts.path, MASK if parts.query else "", parts.fragment))
