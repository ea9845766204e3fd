"""Where cache entries and outputs live: a local path (NFS included) or a URI (s3://, gs://, file://, ...).

Local paths stay `pathlib.Path`, handled exactly as before. A URI becomes a `RemotePath`: the few pathlib
operations the stages use, done through the pyarrow filesystem that `FileSystem.from_uri` picks (the same
filesystems Ray Data and Ray Train use, so every node reads and writes the same place). Credentials come
from the provider's usual chain (environment, instance role, workload identity), never from the URI:
a URI holding `user:password@` or `?options` is refused, so that no secret ends up in a log or a manifest.

Writes that must appear whole (manifests, shards) go to a temporary name first and are then moved into
place with `replace`: a rename on local disks; on object stores one object copy, which readers also see
either whole or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import pyarrow.fs as pafs

from pipeline.errors import ConfigError, PipelineError
from pipeline.uris import check_uri, is_uri

DEFAULT_LOCAL_CACHE = "~/.cache/dpo-pipeline"


class StorageError(PipelineError):
    """A cache or output location cannot be written: missing permission, read-only, full, not a directory."""


def location(p: str | os.PathLike) -> Location:
    """A Path for a local path (`~` expanded), a RemotePath for a URI."""
    if is_uri(p):
        check_uri("path", str(p))
        try:
            fs, path = pafs.FileSystem.from_uri(str(p))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{p}: not a URI that pyarrow can open ({e})") from None
        return RemotePath(fs, path.rstrip("/"), str(p)[: str(p).index("://") + 3])
    return Path(p).expanduser()


def local_cache_dir(cache_dir: str | os.PathLike) -> Path:
    """Where files that must be on a local disk go (the converted builtin model, the generated builtin data):
    `cache_dir` itself when it is local, else the default local cache of this machine."""
    return Path(DEFAULT_LOCAL_CACHE if is_uri(cache_dir) else cache_dir).expanduser()


@dataclass(frozen=True)
class _Stat:
    st_size: int
    st_mtime_ns: int


@dataclass(frozen=True)
class RemotePath:
    """A file or directory on a pyarrow filesystem, with the pathlib methods the cache and outputs use."""

    fs: pafs.FileSystem
    path: str  # the filesystem's own path, e.g. "bucket/cache/reference/<key>"
    scheme: str  # "s3://", "gs://", "file://": str() gives back a URI that Ray Data and pyarrow resolve

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(self.fs, f"{self.path}/{name}", self.scheme)

    def __str__(self) -> str:
        return f"{self.scheme}{self.path}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.fs, self.path.rsplit("/", 1)[0], self.scheme)

    def expanduser(self) -> RemotePath:
        return self

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return bool(self._info().type != pafs.FileType.NotFound)

    def is_file(self) -> bool:
        return bool(self._info().type == pafs.FileType.File)

    def is_dir(self) -> bool:
        return bool(self._info().type == pafs.FileType.Directory)

    def stat(self) -> _Stat:
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(errno.ENOENT, "No such file", str(self))
        return _Stat(info.size or 0, info.mtime_ns or 0)

    def iterdir(self) -> Iterator[RemotePath]:
        for info in self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True)):
            yield RemotePath(self.fs, info.path, self.scheme)

    def open(self, mode: str = "rb") -> Any:
        if mode == "rb":
            return self.fs.open_input_file(self.path)  # seekable: Parquet readers need it
        if mode == "wb":
            return self.fs.open_output_stream(self.path)
        raise ValueError(f"RemotePath.open supports 'rb' and 'wb', not {mode!r}")

    def read_bytes(self) -> bytes:
        with self.open("rb") as fh:
            return bytes(fh.read())

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        with self.open("wb") as fh:
            fh.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        self.fs.create_dir(self.path, recursive=parents)

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        self.fs.delete_file(self.path)


Location = Path | RemotePath


# --- operations that differ between a local disk and a pyarrow filesystem ---


@overload
def atomic_target(
    target: Path, directory: bool = False, keep_existing: bool = False
) -> contextlib.AbstractContextManager[Path]: ...
@overload
def atomic_target(
    target: Location, directory: bool = False, keep_existing: bool = False
) -> contextlib.AbstractContextManager[Location]: ...
@contextlib.contextmanager  # type: ignore[misc]  # the overloads above give the precise types
def atomic_target(target: Location, directory: bool = False, keep_existing: bool = False) -> Iterator[Location]:
    """Where the block writes `target` (a file, or a directory with `directory`) so that readers never take half
    of it for the whole. When the block fails, what it wrote is removed. Failed writes become StorageError (see
    `writing`).

    Local: a temporary sibling, which takes `target`'s place in one rename when the block succeeds. A directory
    already at `target` is never replaced, as other jobs may be reading it: with `keep_existing` (another process
    finished first) the new one is dropped, else it is a StorageError.

    Object store (a RemotePath): `target` itself, as nothing there moves in one step (S3 copies an object to
    move it, and refuses to copy one above 5 GiB). A file is one upload, seen whole or not at all; a directory is
    a cache entry, which readers ignore until its manifest is written, last (`manifests.write_manifest`). A
    directory already at `target` is refused before anything is written (`keep_existing` too).

        with atomic_target(path / "manifest.json") as tmp:
            tmp.write_text(text)
    """
    with writing(target):
        if isinstance(target, RemotePath):
            if directory and target.exists():
                raise StorageError(f"cannot write {target}: it exists already, and an entry is never written over")
            (target if directory else target.parent).mkdir(parents=True, exist_ok=True)
            try:
                yield target
            except BaseException:
                rmtree(target) if directory else target.unlink(missing_ok=True)
                raise
            return
        parent = target.parent
        parent.mkdir(parents=True, exist_ok=True)
        name = f".{target.name}-"
        tmp = Path(tempfile.mkdtemp(prefix=name, dir=parent)) if directory else parent / f"{name}{uuid.uuid4().hex}"
        try:
            yield tmp
            if not directory:
                _fsync(tmp)
            if directory and target.exists():
                if not keep_existing:
                    raise StorageError(
                        f"cannot write {target}: another job wrote it meanwhile, and an entry is never replaced "
                        "under its readers. Rerun to reuse it."
                    )
                rmtree(tmp)
                return
            os.replace(tmp, target)
        except BaseException:
            rmtree(tmp) if directory else tmp.unlink(missing_ok=True)
            raise


def write_json_atomic(path: Location, payload: Any) -> None:
    """Write JSON so that readers never see half a file (`atomic_target`)."""
    with atomic_target(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))


def _fsync(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def rmtree(p: Location) -> None:
    if isinstance(p, RemotePath):
        if p.exists():
            p.fs.delete_dir(p.path)
    else:
        shutil.rmtree(p, ignore_errors=True)


class LocalMirror:
    """A local folder standing for `target`, for writers that need one (TensorBoard, save_pretrained): the
    folder itself when local; for a URI a local working copy that starts with the `fetch` entries found
    there (what a resumed run reads back) and is uploaded by push()."""

    def __init__(self, target: str, fetch: tuple[str, ...] = ()):
        where = location(target)
        self.remote = where if isinstance(where, RemotePath) else None
        self.local = where if isinstance(where, Path) else Path(tempfile.mkdtemp(prefix="dpo-output-"))
        if isinstance(where, RemotePath):
            for name in fetch:
                if (where / name).exists():
                    _copy_tree(where.fs, (where / name).path, pafs.LocalFileSystem(), str(self.local / name))

    def push(self) -> None:
        if self.remote is not None:
            with writing(self.remote):
                _copy_tree(pafs.LocalFileSystem(), str(self.local), self.remote.fs, self.remote.path)

    def close(self) -> None:
        """Drop the local copy of a URI target (after the last push)."""
        if self.remote is not None:
            shutil.rmtree(self.local, ignore_errors=True)


def _copy_tree(src_fs: pafs.FileSystem, src: str, dst_fs: pafs.FileSystem, dst: str) -> None:
    """Copy a file, or a directory tree, creating the directories (a local destination needs them)."""
    info = src_fs.get_file_info(src)
    files = (
        [info]
        if info.type == pafs.FileType.File
        else [f for f in src_fs.get_file_info(pafs.FileSelector(src, recursive=True)) if f.type == pafs.FileType.File]
    )
    for f in files:
        target = dst if f.path == info.path else f"{dst}/{f.path[len(info.path) :].lstrip('/')}"
        dst_fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(f.path, target, source_filesystem=src_fs, destination_filesystem=dst_fs)


def parquet_source(files: list[str]) -> tuple[pafs.FileSystem | None, list[str]]:
    """(filesystem, paths) for pyarrow.parquet readers that accept one filesystem and plain paths."""
    if not files or not is_uri(files[0]):
        return None, files
    first = location(files[0])
    assert isinstance(first, RemotePath)
    return first.fs, [location(f).path for f in files]  # type: ignore[union-attr]


# --- clear errors for locations that cannot be written ---

WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EFBIG)


def write_problem(e: BaseException) -> str | None:
    """The reason an OSError (possibly wrapped by Ray) says a write failed, or None if it is not one."""
    seen: set[int] = set()
    current: Any = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            code = current.errno if current.errno in WRITE_ERRNOS else _errno_in(str(current))
            if code is not None:
                return os.strerror(code)
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    return None


def _errno_in(text: str) -> int | None:
    """pyarrow's OSErrors carry the errno only in their message ("... [errno 28] No space left on device")."""
    lowered = text.lower()
    return next(
        (code for code in WRITE_ERRNOS if f"errno {code}]" in lowered or os.strerror(code).lower() in lowered), None
    )


@contextlib.contextmanager
def writing(target: Location | str) -> Iterator[None]:
    """Turn a failed write under `target` into a StorageError naming the place and the reason."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as e:
        reason = write_problem(e)
        if reason is None:
            raise
        raise StorageError(f"cannot write {target}: {reason}") from None


def check_writable(target: str, key: str) -> None:
    """Create `target` if needed and write and delete a probe file there: fail early, with the config key."""
    where = location(target)
    probe = where / f".write-test-{uuid.uuid4().hex}"
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = write_problem(e) or str(e)
        raise StorageError(f"{key}={target} is not writable: {reason}") from None
