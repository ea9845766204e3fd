"""Claims on cache entries (pipeline.cache.claims): one builder at a time, waiters told and let in after release, stale
claims of dead or silent owners taken over, the heartbeat kept fresh while the owner works. Then the issue's
case end to end: two `run`s started at once on one cache_dir with different beta both succeed, each entry is
written once, and the reference is scored once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipeline.cache import claims
from pipeline.cache.claims import claim_file, claimed

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
