"""One builder per cache entry at a time: a claim file beside the entry, naming its owner, refreshed while it works.

    with found_or_claimed(path, label, lambda: reusable(path, key, ...)) as found:
        if found is None:
            build(path)  # this job holds the claim

Two jobs on one cache_dir (a sweep launched at once) need the same entries. The first to create
`<entry>.claim` builds the entry; the others wait. Whoever takes the claim, after waiting or not, looks for the
finished entry again and reuses it (stage 2: or scores the shards still missing): a job that takes the claim
just after another released it never rebuilds, and so never replaces, an entry others may be reading. The owner
rewrites the claim's heartbeat every HEARTBEAT_S seconds; a claim is stale, and taken over, when its heartbeat is
older than STALE_S or its owner was a process of this host that no longer exists (a killed job).

A finished entry is never deleted or replaced in place: `storage.atomic_target` refuses to move a new directory
over one, and `--force` moves a finished local entry aside (one rename: files a job holds open stay whole, and
the pipeline never deletes it) and refuses one on an object store, where no directory moves in one step.

Limits: on a local or shared file system the claim is created with O_EXCL (atomic on local disks and NFSv3+).
Object stores have no exclusive create: the claim is written, read back after SETTLE_S, and held by whoever's
token is read; two jobs whose check and write are more than SETTLE_S apart could both build. The second to
finish a directory entry then stops with a StorageError and leaves the first one's in place (a rerun reuses
it); stage 2 rewrites the same shards, each whole: work done twice, never a mixed or replaced entry. Heartbeat
ages compare wall clocks of different hosts: keep them in sync (NTP) within a fraction of STALE_S.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pipeline.cache.manifests import MANIFEST
from pipeline.cache.storage import Location, RemotePath, rmtree, write_json_atomic, writing
from pipeline.errors import CacheError, PipelineError

HEARTBEAT_S = float(os.environ.get("DPO_CLAIM_HEARTBEAT_S", "10"))
STALE_S = float(os.environ.get("DPO_CLAIM_STALE_S", "120"))
SETTLE_S = 2.0
POLL_S = 1.0

T = TypeVar("T")


def claim_file(entry: Location) -> Location:
    return entry.parent / f"{entry.name}.claim"


@contextlib.contextmanager
def claimed(entry: Location, label: str) -> Iterator[bool]:
    """Hold the claim on `entry` for the block. Yields True when another job held it first. Stages take it
    through `found_or_claimed`, which looks for the finished entry once the claim is held."""
    path = claim_file(entry)
    me = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
    waited = False
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        while not _create(path, {**me, "heartbeat": time.time()}):
            other = _read(path)
            if other is None:  # released between our attempt and the read
                continue
            if other.get("token") == me["token"]:  # object store: a torn read-back, but our write landed last
                break
            if _is_stale(other):
                print(f"{label}: taking over the stale claim {path} of {_describe(other)}", flush=True)
                _take_over(path, other)
                continue
            if not waited:
                print(f"{label}: waiting for {_describe(other)}, which is building {entry}", flush=True)
                waited = True
            time.sleep(POLL_S)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, me, stop), daemon=True)
    beat.start()
    try:
        yield waited
    finally:
        stop.set()
        beat.join()
        if (_read(path) or {}).get("token") == me["token"]:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def found_or_claimed(
    entry: Location, label: str, find: Callable[[], T | None], force: bool = False
) -> Iterator[T | None]:
    """What `find` returns for the finished entry, to reuse; else None, and the block builds the entry while this
    job holds its claim. `find` returns None where there is nothing to reuse and raises on an entry it refuses.

    The first look takes no claim (reusing costs a few stats), and only an entry with its manifest is looked at:
    a directory without one is being committed by its builder or was left unfinished, and the claim tells which.
    Once the claim is held, `find` looks again, whether or not this job waited: a job that released the claim in
    between has left a finished entry, which is reused rather than rebuilt. `force` (a --force rebuild) skips
    both looks and clears the entry (`_make_way`), unless this job had to wait: the other job has just built
    the entry, and it is reused.
    """
    if not force and (entry / MANIFEST).exists():
        found = find()
        if found is not None:
            yield found
            return
    with claimed(entry, label) as waited:
        if force and not waited:
            _make_way(entry, label)
            yield None
        else:
            yield find()


def _make_way(entry: Location, label: str) -> None:
    """Clear `entry` for a --force rebuild without deleting a finished entry under the jobs reading it."""
    if not entry.exists():
        return
    if not (entry / MANIFEST).exists():
        rmtree(entry)  # unfinished: every reader refuses it, so nobody is reading it
        return
    if isinstance(entry, RemotePath):
        raise CacheError(
            f"{label}: --force does not replace the finished entry {entry}: on an object store it cannot be moved "
            "aside in one step, and other jobs may be reading it. Delete it once no job uses it, then rerun."
        )
    aside = entry.with_name(f".{entry.name}.replaced-{uuid.uuid4().hex[:8]}")
    os.replace(entry, aside)  # one rename: files a job holds open stay whole
    print(f"{label}: --force: moved the old entry to {aside}; delete it once no job uses it", flush=True)


def _create(path: Location, owner: dict[str, Any]) -> bool:
    """Create the claim file if there is none; True when it is ours."""
    text = json.dumps(owner)
    if isinstance(path, Path):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
        except BaseException:  # a full disk: leave no empty claim behind for others to wait on
            path.unlink(missing_ok=True)
            raise
        return True
    if path.exists():
        return False
    path.write_text(text)
    time.sleep(SETTLE_S)  # a concurrent writer's claim lands by now; the last write wins for both readers
    return bool((_read(path) or {}).get("token") == owner["token"])


def _read(path: Location) -> dict[str, Any] | None:
    """The claim's content; None when there is none. A claim that is not (yet) whole JSON counts as written at
    its modification time: fresh while being created, stale once that is STALE_S ago."""
    try:
        text = path.read_text()
        written = path.stat().st_mtime_ns / 1e9
    except FileNotFoundError:
        return None
    try:
        found: dict[str, Any] = json.loads(text)
        return found
    except json.JSONDecodeError:
        return {"token": "", "host": "?", "pid": -1, "heartbeat": written}


def _is_stale(owner: dict[str, Any]) -> bool:
    if time.time() - float(owner.get("heartbeat", 0)) > STALE_S:
        return True
    return owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1)))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # unknown: leave it to the heartbeat
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_over(path: Location, stale: dict[str, Any]) -> None:
    """Remove a stale claim so that the next create can win. Locally the claim is moved aside first (one of
    two jobs taking over wins the move) and put back if what was moved is not the claim judged stale."""
    if not isinstance(path, Path):
        path.unlink(missing_ok=True)
        return
    aside = path.with_name(f"{path.name}.{uuid.uuid4().hex}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    if (_read(aside) or {}).get("token") != stale.get("token"):
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)  # a fresh claim of a third job: give it back unless a new one is there
    aside.unlink(missing_ok=True)


def _heartbeat(path: Location, me: dict[str, Any], stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        current = _read(path)
        if current is None or current.get("token") != me["token"]:
            print(f"[cache] warning: lost the claim {path} (taken over as stale); keep clocks in sync", flush=True)
            return
        try:
            write_json_atomic(path, {**me, "heartbeat": time.time()})
        except PipelineError as e:  # e.g. a full disk: the work itself will meet it and say so
            print(f"[cache] warning: could not refresh the claim {path}: {e}", flush=True)


def _describe(owner: dict[str, Any]) -> str:
    age = time.time() - float(owner.get("heartbeat", 0))
    return f"process {owner.get('pid')} on {owner.get('host')} (heartbeat {age:.0f}s ago)"
