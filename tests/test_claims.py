"""Claims on cache entries (pipeline.cache.claims): one builder at a time, waiters told and let in after release, stale
claims of dead or silent owners taken over, the heartbeat kept fresh while the owner works. Then races for one
entry (`found_or_claimed`), on a local disk and on the object-store path (file:// URIs): two processes released
at once build it once, a claim taken just after a release and a look during the builder's commit reuse it, and
--force never deletes a finished entry. Then the issue's case end to end: two `run`s started at once on one
cache_dir with different beta both succeed, each entry is written once, and the reference is scored once."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from pipeline.cache import claims, manifests, storage
from pipeline.cache.claims import claim_file, claimed, found_or_claimed
from pipeline.cache.storage import Location
from pipeline.errors import CacheError

ROOT = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pipeline.cache.claims import claimed
    entry, seconds = Path(sys.argv[1]), float(sys.argv[2])
    with claimed(entry, "[holder]"):
        print("held", flush=True)
        time.sleep(seconds)
        (entry.parent / "holder-done").write_text(str(time.time()))
    """
)


def start_holder(entry: Path, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(entry), str(seconds)], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)  # fmt: skip
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_second_claimant_waits_for_release_and_is_told(tmp_path, capsys):
    entry = tmp_path / "reference" / "abc"
    holder = start_holder(entry, 2.0)
    with claimed(entry, "[score-ref] train") as waited:
        got_at = time.time()
        assert claim_file(entry).exists()
    assert holder.wait(10) == 0
    assert waited
    assert got_at >= float((tmp_path / "reference" / "holder-done").read_text())  # only after the holder finished
    out = capsys.readouterr().out
    assert f"[score-ref] train: waiting for process {holder.pid} on {socket.gethostname()}" in out
    assert not claim_file(entry).exists()  # released


def test_uncontended_claim_does_not_wait_and_is_removed(tmp_path):
    entry = tmp_path / "tokenized" / "k"
    with claimed(entry, "[tokenize] train") as waited:
        owner = json.loads(claim_file(entry).read_text())
    assert not waited and owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert not claim_file(entry).exists()


def test_claim_of_a_killed_process_is_taken_over_at_once(tmp_path, capsys):
    entry = tmp_path / "table" / "k"
    holder = start_holder(entry, 60.0)
    holder.kill()
    holder.wait()
    assert claim_file(entry).exists()  # left behind by the SIGKILL
    start = time.time()
    with claimed(entry, "[train] train") as waited:
        assert json.loads(claim_file(entry).read_text())["pid"] == os.getpid()
    assert time.time() - start < 5 and not waited
    assert f"taking over the stale claim {claim_file(entry)} of process {holder.pid}" in capsys.readouterr().out


def test_claim_with_an_old_heartbeat_from_another_host_is_taken_over(tmp_path, monkeypatch):
    entry = tmp_path / "reference" / "k"
    entry.parent.mkdir(parents=True)
    old = {"token": "t", "host": "other-node", "pid": 1, "heartbeat": time.time() - 30}
    claim_file(entry).write_text(json.dumps(old))
    monkeypatch.setattr(claims, "STALE_S", 60.0)
    done = threading.Event()

    def claim_in_thread() -> None:
        with claimed(entry, "[x]"):
            done.set()

    t = threading.Thread(target=claim_in_thread, daemon=True)
    t.start()
    assert not done.wait(2.5)  # 30 s old is alive within a 60 s limit: it waits
    claim_file(entry).write_text(json.dumps({**old, "heartbeat": time.time() - 61}))  # now silent too long
    assert done.wait(5)
    t.join(5)


def test_heartbeat_is_refreshed_while_the_owner_works(tmp_path, monkeypatch):
    entry = tmp_path / "reference" / "k"
    monkeypatch.setattr(claims, "HEARTBEAT_S", 0.2)
    with claimed(entry, "[x]"):
        first = json.loads(claim_file(entry).read_text())["heartbeat"]
        time.sleep(1.0)
        later = json.loads(claim_file(entry).read_text())["heartbeat"]
    assert later - first >= 0.6


def test_object_store_claim_read_back_torn_is_still_ours(tmp_path, monkeypatch, capsys):
    """The object-store claim is read back after SETTLE_S; a read that catches another job's write half done
    says "not ours" even when our write landed last. The next look finds our own token: the claim is held at
    once, never waited on (until it goes stale) as if another job held it."""
    monkeypatch.setattr(claims, "SETTLE_S", 0.01)
    monkeypatch.setattr(claims, "STALE_S", 1.0)
    real_read, reads = claims._read, []

    def torn_first(path: Location) -> dict[str, Any] | None:
        reads.append(path)
        return {"token": "", "host": "?", "pid": -1, "heartbeat": time.time()} if len(reads) == 1 else real_read(path)

    monkeypatch.setattr(claims, "_read", torn_first)
    with claimed(storage.location(f"file://{tmp_path}/cache") / "k", "[x]") as waited:
        assert not waited
    assert "waiting for" not in capsys.readouterr().out


# --- races for one entry: found_or_claimed on a local disk and on the object-store path ---

KEY = "k"


def entry_root(tmp_path: Path, remote: bool) -> str:
    return f"file://{tmp_path}/cache" if remote else str(tmp_path / "cache")


def build(entry: Location, builds: Path, commit_s: float = 0.0) -> None:
    """Build `entry` as the stages do: data moved into place whole, then the manifest last. Each build appends its
    token to `builds`, and the entry's data is that token."""
    token = uuid.uuid4().hex
    with builds.open("a") as log:
        log.write(f"{entry.name} {token}\n")
    with storage.atomic_target(entry, directory=True) as tmp:
        (tmp / "data.txt").write_text(token)
        time.sleep(0.2)  # long enough for the other job's claim attempt to land while this one builds
    time.sleep(commit_s)  # the entry is in place without its manifest
    manifests.write_manifest(entry, KEY, "test", ["data.txt"], rows=1)


def find(entry: Location) -> dict[str, Any] | None:
    """The manifest of a finished entry; None when there is none; CacheError for one without its manifest."""
    return manifests.read_valid_manifest(entry, KEY, "") if entry.exists() else None


def contend(roots: list[str], rounds: int, barrier: Any, builds: Path, outcomes: Path) -> None:
    """One of two jobs: each round, released by the barrier with the other, get entry-<round> under each root,
    built or reused."""
    claims.SETTLE_S, claims.POLL_S = 0.3, 0.05
    for root in roots:
        for r in range(rounds):
            entry = storage.location(root) / f"entry-{r}"
            barrier.wait(timeout=30)
            with found_or_claimed(entry, "[job]", partial(find, entry)) as found:
                if found is None:
                    build(entry, builds)
            with outcomes.open("a") as log:
                how = "built" if found is None else "reused"
                log.write(f"{root} {r} {how} {(entry / 'data.txt').read_text()}\n")


def test_two_jobs_released_at_once_build_an_entry_once(tmp_path):
    """Two processes race for each of a few entries, on a local disk and on the object-store path: each entry is
    built once, by one of them, and the other reuses that very build."""
    rounds, builds, outcomes = 3, tmp_path / "builds.log", tmp_path / "outcomes.log"
    roots = [entry_root(tmp_path / "local", remote=False), entry_root(tmp_path / "remote", remote=True)]
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no fork of this test process's threads
    barrier = ctx.Barrier(2)
    jobs = [ctx.Process(target=contend, args=(roots, rounds, barrier, builds, outcomes)) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
    assert [job.exitcode for job in jobs] == [0, 0]
    tokens = [line.split()[1] for line in builds.read_text().splitlines()]
    assert len(tokens) == 2 * rounds  # one build per entry
    seen = sorted(line.split() for line in outcomes.read_text().splitlines())
    assert [s[2] for s in seen] == ["built", "reused"] * 2 * rounds  # one builder, one reuser, per entry
    assert all(built[3] == reused[3] for built, reused in zip(seen[::2], seen[1::2]))  # reused that very build
    assert sorted(s[3] for s in seen[::2]) == sorted(tokens)
    for where in ("local", "remote"):  # nothing else left behind: no claim, no temporary directory
        assert sorted(p.name for p in (tmp_path / where / "cache").iterdir()) == [f"entry-{r}" for r in range(rounds)]


@pytest.mark.parametrize("remote", [False, True], ids=["local", "object-store"])
def test_a_claim_taken_just_after_a_release_reuses_the_entry(tmp_path, monkeypatch, capsys, remote):
    """Job B looks, finds nothing, and claims only after job A has built the entry and released it: B never
    waits, and still reuses A's entry instead of building it again over A's readers."""
    monkeypatch.setattr(claims, "SETTLE_S", 0.05)
    entry, builds = storage.location(entry_root(tmp_path, remote)) / "entry", tmp_path / "builds.log"
    real_claimed = claims.claimed

    @contextlib.contextmanager
    def a_builds_first(entry: Location, label: str) -> Any:
        if label == "[B]":  # between B's first look and B's claim
            with found_or_claimed(entry, "[A]", partial(find, entry)) as found:
                assert found is None
                build(entry, builds)
        with real_claimed(entry, label) as waited:
            yield waited

    monkeypatch.setattr(claims, "claimed", a_builds_first)
    with found_or_claimed(entry, "[B]", partial(find, entry)) as found:
        assert found is not None and found["key"] == KEY
    (line,) = builds.read_text().splitlines()  # built once, by A
    assert (entry / "data.txt").read_text() == line.split()[1]
    assert "waiting for" not in capsys.readouterr().out


@pytest.mark.parametrize("remote", [False, True], ids=["local", "object-store"])
def test_a_look_while_the_builder_commits_waits_and_reuses(tmp_path, monkeypatch, remote):
    """The entry's directory is in place but its manifest not yet written: a job looking then is not refused
    (an unfinished entry) but waits on the claim and reuses the entry once it is finished."""
    monkeypatch.setattr(claims, "SETTLE_S", 0.05)
    monkeypatch.setattr(claims, "POLL_S", 0.05)
    entry, builds = storage.location(entry_root(tmp_path, remote)) / "entry", tmp_path / "builds.log"

    def builder() -> None:
        with found_or_claimed(entry, "[A]", partial(find, entry)):
            build(entry, builds, commit_s=1.0)

    a = threading.Thread(target=builder)
    a.start()
    deadline = time.time() + 10
    while not entry.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert entry.exists() and not (entry / manifests.MANIFEST).exists()  # A is between its move and its manifest
    with found_or_claimed(entry, "[B]", partial(find, entry)) as found:
        assert found is not None and found["rows"] == 1
    a.join(10)
    assert len(builds.read_text().splitlines()) == 1


@pytest.mark.parametrize("remote", [False, True], ids=["local", "object-store"])
def test_force_clears_an_unfinished_entry_but_never_deletes_a_finished_one(tmp_path, monkeypatch, capsys, remote):
    """--force removes an entry without its manifest; a finished one is moved aside whole (local) or refused."""
    monkeypatch.setattr(claims, "SETTLE_S", 0.05)
    root, builds = storage.location(entry_root(tmp_path, remote)), tmp_path / "builds.log"
    unfinished = root / "unfinished"
    unfinished.mkdir(parents=True, exist_ok=True)
    (unfinished / "data.txt").write_text("half")
    with found_or_claimed(unfinished, "[x]", partial(find, unfinished), force=True) as found:
        assert found is None and not unfinished.exists()  # nobody reads an entry without its manifest

    entry = root / "entry"
    build(entry, builds)
    old = (entry / "data.txt").read_text()
    if remote:  # no directory moves in one step there: refused, the entry left as it is
        refused = pytest.raises(CacheError, match="--force does not replace the finished entry")
        with refused, found_or_claimed(entry, "[x]", partial(find, entry), force=True):
            pass
        assert find(entry) is not None and (entry / "data.txt").read_text() == old
        return
    with found_or_claimed(entry, "[x]", partial(find, entry), force=True) as found:
        assert found is None and not entry.exists()
        build(entry, builds)
    (aside,) = [p for p in tmp_path.joinpath("cache").iterdir() if p.name.startswith(".entry.replaced-")]
    assert find(aside) is not None and (aside / "data.txt").read_text() == old  # moved aside whole
    assert find(entry) is not None and (entry / "data.txt").read_text() != old
    assert f"moved the old entry to {aside}" in capsys.readouterr().out


@pytest.mark.slow
def test_two_runs_at_once_on_one_cache_share_each_entry(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Colour {i}?", "chosen": f" red {i}", "rejected": f" no {i + 1}"} for i in range(24)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "cache"
    procs = []
    for beta in ("0.1", "0.5"):
        args = ["run", "--model", str(tiny_model_dir), "--dataset", str(tmp_path / "pairs.jsonl"),
                "--cache_dir", str(cache), "--output_dir", str(tmp_path / f"out-{beta}"), "--max_steps", "2",
                "--per_device_train_batch_size", "4", "--num_workers", "1", "--cpus_per_worker", "1",
                "--ref_actors", "1", "--cpus_per_ref_actor", "1", "--beta", beta]  # fmt: skip
        code = "import sys; from stages.cli import main; sys.exit(main(sys.argv[1:]))"
        procs.append(subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    for kind in ("tokenized", "reference", "table"):
        entries = [p for p in (cache / kind).iterdir() if not p.name.startswith(".")]
        assert len(entries) == 1, (kind, entries)  # one entry per key, no claim or temp left behind
    scored = [o for o in outs if "pairs scored in" in o]
    assert len(scored) == 1, outs  # the reference was scored once; the other run reused it
    for beta, out in zip(("0.1", "0.5"), outs):
        summary = json.loads((tmp_path / f"out-{beta}" / "train_summary.json").read_text())
        assert summary["train_steps"] == 2 and summary["config"]["beta"] == float(beta), out[-2000:]
