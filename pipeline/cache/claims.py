"""One builder per cache entry at a time: a claim file beside the entry, naming its owner, refreshed while it works.

Two jobs on one cache_dir (a sweep launched at once) need the same entries. The first to create
`<entry>.claim` builds the entry; the others wait, then find it complete and reuse it (stage 2: or score the
shards still missing). The owner rewrites the claim's heartbeat every HEARTBEAT_S seconds; a claim is stale,
and taken over, when its heartbeat is older than STALE_S or its owner was a process of this host that no longer
exists (a killed job).

Limits: on a local or shared file system the claim is created with O_EXCL (atomic on local disks and NFSv3+).
Object stores have no exclusive create: the claim is written, read back after SETTLE_S, and held by whoever's
token is read; two jobs whose check and write are more than SETTLE_S apart could both proceed. Entries are still
written atomically (`storage.atomic_target`), so the worst case is work done twice, never a mixed entry.
Heartbeat ages compare wall clocks of different hosts: keep them in sync (NTP) within a fraction of STALE_S.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.cache.storage import Location, write_json_atomic, writing
from pipeline.errors import PipelineError

HEARTBEAT_S = float(os.environ.get("DPO_CLAIM_HEARTBEAT_S", "10"))
STALE_S = float(os.environ.get("DPO_CLAIM_STALE_S", "120"))
SETTLE_S = 2.0
POLL_S = 1.0


def claim_file(entry: Location) -> Location:
    return entry.parent / f"{entry.name}.claim"


@contextlib.contextmanager
def claimed(entry: Location, label: str) -> Iterator[bool]:
    """Hold the claim on `entry` for the block. Yields True when another job held it first: the caller then
    looks for that job's result before building."""
    path = claim_file(entry)
    me = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
    waited = False
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        while not _create(path, {**me, "heartbeat": time.time()}):
            other = _read(path)
            if other is None:  # released between our attempt and the read
                continue
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
            print(f"warning: lost the claim {path} (taken over as stale); keep clocks in sync", flush=True)
            return
        try:
            write_json_atomic(path, {**me, "heartbeat": time.time()})
        except PipelineError as e:  # e.g. a full disk: the work itself will meet it and say so
            print(f"warning: could not refresh the claim {path}: {e}", flush=True)


def _describe(owner: dict[str, Any]) -> str:
    age = time.time() - float(owner.get("heartbeat", 0))
    return f"process {owner.get('pid')} on {owner.get('host')} (heartbeat {age:.0f}s ago)"
