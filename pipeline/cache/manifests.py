"""The content-addressed cache: keys, manifests, validation.

An entry is a directory `<cache_dir>/<kind>/<key>/` of data files plus `manifest.json`, written last.
The manifest names the key, the inputs that made it, the row count and a size and checksum per file.
An entry is valid only if its manifest parses, names the expected key and every file is there with its
size; anything else is refused with a message saying what is wrong, never used and never silently rebuilt.
Checksums are computed when the manifest is written and checked again only on request (`verify`, the
`--verify` flag): a lookup then costs a few stat calls instead of reading the whole entry.
`cache_dir` is a local path or a URI (pipeline.cache.storage): the same rules hold on both.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from pipeline.cache import storage
from pipeline.cache.fingerprints import content_digest
from pipeline.cache.storage import Location
from pipeline.errors import CacheError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CacheEntry:
    """A valid cache entry: its directory, key and manifest."""

    path: Location
    key: str
    manifest: dict[str, Any]

    @property
    def files(self) -> list[str]:
        return [str(self.path / name) for name in sorted(self.manifest["files"])]


def cache_key(**parts: Any) -> str:
    """A stable hash of named parts (JSON-serialisable)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def entry_dir(cache_dir: str | os.PathLike, kind: str, key: str) -> Location:
    return storage.location(cache_dir) / kind / key


def describe_files(directory: Location, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and checksum (`fingerprints.content_digest`, read now, never remembered) of each data file."""
    return {n: {"bytes": (directory / n).stat().st_size, "checksum": content_digest(directory / n)} for n in names}


def write_manifest(
    directory: Location, key: str, kind: str, files: list[str], rows: int, **info: Any
) -> dict[str, Any]:
    """Checksum the data files and write the manifest last: from here on the entry is valid."""
    manifest = {
        "key": key,
        "kind": kind,
        "rows": rows,
        "files": describe_files(directory, files),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **info,
    }
    storage.write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def read_valid_manifest(directory: Location, key: str, produce_hint: str, verify: bool = False) -> dict[str, Any]:
    """The manifest of a valid entry, or CacheError saying what is wrong and what to do. Every file must exist
    with its recorded size; with `verify` (`--verify`) its checksum is recomputed too, which reads the entry."""
    path = directory / MANIFEST
    if not directory.exists():
        raise CacheError(f"no cache entry at {directory}. {produce_hint}")
    if not path.is_file():
        raise CacheError(
            f"cache entry {directory} is incomplete (no {MANIFEST}: it was interrupted before it "
            f"finished). {produce_hint}"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(
            f"cache entry {directory}: {MANIFEST} is unreadable ({e}); the entry is corrupt. "
            "Delete the directory or rerun with --force."
        ) from None
    if manifest.get("key") != key:
        raise CacheError(
            f"cache entry {directory}: manifest key {manifest.get('key')!r} does not match the "
            f"expected key {key!r}; the entry was moved or edited. Delete it or rerun with --force."
        )
    for name, meta in manifest.get("files", {}).items():
        f = directory / name
        if not f.is_file():
            raise CacheError(
                f"cache entry {directory}: file {name} listed in the manifest is missing. "
                "Delete the directory or rerun with --force."
            )
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CacheError(
                f"cache entry {directory}: {name} has {size} bytes, the manifest says "
                f"{meta['bytes']} (truncated or overwritten). Delete the directory or rerun with --force."
            )
        if verify and content_digest(f) != meta.get("checksum"):
            raise CacheError(
                f"cache entry {directory}: {name} fails its checksum (corrupt). Delete the directory "
                "or rerun with --force."
            )
    return dict(manifest)
