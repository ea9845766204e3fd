"""Content hashes of files (model weights, input data, cache entry files), computed once and remembered.

    digests = file_fingerprints(paths, cache_dir)   # remembered: in this process, and on disk across commands
    digest = content_digest(path)                   # always reads the file (cache manifests, --verify)

The digest is a tree hash, not blake2b of the whole file: the file is cut into CHUNK_BYTES chunks, the chunks
are hashed (blake2b) on a thread pool — os.pread and hashlib release the GIL, so they run in parallel — and the
root hashes the version, the chunk size, the file size and the chunk digests in order. Only equality matters
(cache keys, checksums), so any fixed scheme serves; FINGERPRINT_VERSION is in every root, so a new scheme
changes every key instead of being confused with an old one.

A local file's digest is remembered by (absolute path, size, mtime_ns, inode): in this process (`run` asks for
the weights' fingerprint once per stage and split) and in `<cache_dir>/fingerprints.json` — on an object store
too, so that every driver sharing the cache (a fresh driver pod of each job) finds the digests of the files it
sees at the same path, size, mtime and inode (a shared file system's), and a repeat command reads no weights.
A file modified less than RACY_NS before it was hashed is not remembered: another write within the same
timestamp tick could leave size, mtime and inode unchanged (git's "racy" case). The memo file is replaced whole
(`storage.write_json_atomic`): readers never see half of it, and when two commands write it at once the last
one wins, which loses at most some remembered digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.cache.storage import Location, RemotePath, StorageError, location, write_json_atomic
from pipeline.errors import PipelineError

FINGERPRINT_VERSION = 2  # 1: blake2b of the whole file, on one thread
CHUNK_BYTES = 32 << 20  # part of the digest's definition: changing it changes every digest
READ_BYTES = 8 << 20  # one read inside a chunk: the memory each thread holds
DIGEST_SIZE = 16
RACY_NS = 2_000_000_000  # a file this recent when hashed is not remembered
MEMO_FILE = "fingerprints.json"
SAVE_EVERY_S = 10.0  # while hashing many files, remember what is done at least this often

MemoKey = tuple[str, int, int, int]  # (absolute path, size, mtime_ns, inode)
_memo: dict[MemoKey, str] = {}  # this process's digests


def default_threads() -> int:
    return min(8, os.cpu_count() or 1)


def content_digest(path: Location, threads: int | None = None) -> str:
    """The tree hash of a file's bytes (local: chunks on `threads` threads; a URI: chunks one after another)."""
    size = path.stat().st_size
    starts = range(0, size, CHUNK_BYTES)
    if isinstance(path, Path):
        fd = os.open(path, os.O_RDONLY)
        try:

            def read(offset: int, n: int) -> bytes:
                return os.pread(fd, n, offset)

            workers = min(threads or default_threads(), len(starts))
            if workers > 1:
                with ThreadPoolExecutor(workers, thread_name_prefix="fingerprint") as pool:
                    digests = list(pool.map(lambda s: _chunk_digest(read, s, size, path), starts))
            else:
                digests = [_chunk_digest(read, s, size, path) for s in starts]
        finally:
            os.close(fd)
    else:
        with path.open("rb") as fh:  # a pyarrow input file: random access with read_at
            digests = [_chunk_digest(lambda offset, n: bytes(fh.read_at(n, offset)), s, size, path) for s in starts]
    root = hashlib.blake2b(f"tree-v{FINGERPRINT_VERSION}:{CHUNK_BYTES}:{size}:".encode(), digest_size=DIGEST_SIZE)
    for d in digests:
        root.update(d)
    return root.hexdigest()


def _chunk_digest(read: Callable[[int, int], bytes], start: int, size: int, path: Location) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    end = min(start + CHUNK_BYTES, size)
    while start < end:
        block = read(start, min(READ_BYTES, end - start))
        if not block:
            raise PipelineError(f"{path} became shorter while it was being read; is something rewriting it?")
        h.update(block)
        start += len(block)
    return h.digest()


def file_fingerprints(paths: Sequence[Location], cache_dir: str | os.PathLike) -> list[str]:
    """`content_digest` of each file, remembered (see the module docstring): a file whose path, size, mtime and
    inode are unchanged since it was hashed is not read again, in this process or a later one. An object (a
    RemotePath) is remembered by its URI, size and modification time (an object store's objects change only by
    being written whole)."""
    store = location(cache_dir) / MEMO_FILE
    saved: dict[str, list[int | str]] | None = None  # the memo file, read at the first digest this process lacks
    fresh: dict[str, list[int | str]] = {}
    last_save = time.monotonic()
    out = []
    for path in paths:
        key = file_key(path)
        digest = _memo.get(key)
        if digest is None:
            saved = _load(store) if saved is None else saved
            entry = saved.get(key[0])
            if entry is not None and tuple(entry[:3]) == key[1:]:
                digest = str(entry[3])
            else:
                started = time.time_ns()
                digest = content_digest(path)
                if not _settled(path, key, started):
                    out.append(digest)
                    continue
                fresh[key[0]] = [*key[1:], digest]
                if time.monotonic() - last_save > SAVE_EVERY_S:
                    _save(store, fresh)
                    last_save = time.monotonic()
            _memo[key] = digest
        out.append(digest)
    if fresh:
        _save(store, fresh)
    return out


def file_key(path: Location) -> MemoKey:
    """(path, size, mtime, inode): what says a file is unchanged since it was last read."""
    if isinstance(path, RemotePath):
        info = path.stat()
        return str(path), info.st_size, info.st_mtime_ns, 0
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino


def _settled(path: Location, key: MemoKey, started_ns: int) -> bool:
    """Whether a digest of `path` may be remembered: unchanged while it was read, and not modified recently."""
    return file_key(path) == key and key[2] < started_ns - RACY_NS


def _load(store: Location) -> dict[str, list[int | str]]:
    """The remembered digests by absolute path: [size, mtime_ns, inode, digest]; none if unreadable or older."""
    try:
        data = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != FINGERPRINT_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _save(store: Location, fresh: dict[str, list[int | str]]) -> None:
    """Merge `fresh` into the memo file as it is now (another command may have added to it) and replace it."""
    files = {**_load(store), **fresh}
    try:
        write_json_atomic(store, {"version": FINGERPRINT_VERSION, "files": files})
    except (OSError, StorageError) as e:  # only speed is lost: the next command hashes again
        print(f"[fingerprints] warning: cannot remember file digests in {store} ({e})", flush=True)
