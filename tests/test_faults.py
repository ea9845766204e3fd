"""Faults around the stages: output locations that cannot be written or are full, and Ctrl-C on the driver.

(A training worker SIGKILLed mid-run and a rerun that resumes: tests/test_stage3_train.py. A scoring driver
killed, then a rerun of the missing shards, and a scoring actor killed while the job runs:
tests/test_stage2_score_ref.py.)

"Unwritable" and "full" are real filesystem conditions, not mocks. We run as root, so permissions do not
stop a write; instead: a path under a regular file (ENOTDIR, no privileges needed), a read-only bind mount
(EROFS) and a tiny tmpfs (ENOSPC). The mounts need CAP_SYS_ADMIN; without it those tests skip and say so.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from pipeline.config import load_config
from pipeline.entries import find_reference, find_tokenized
from pipeline.errors import CacheError
from stages.cli import main

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def mounted(target: Path, *args: str):
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount at {target} ({done.stderr.strip()}): needs root with CAP_SYS_ADMIN")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture
def setup(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"Add {i} and {i}:", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"} for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": str(tiny_model_dir),
        "dataset": [str(tmp_path / "pairs.jsonl")],
        "cache_dir": str(tmp_path / "cache"),
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config))
    return path, config


def manifests(root: Path) -> list[Path]:
    return list(root.rglob("manifest.json")) if root.exists() else []


# --- unwritable ---


def test_cache_dir_under_a_regular_file(setup, tmp_path, capsys):
    cfg, _ = setup
    (tmp_path / "file").write_text("not a directory")
    assert main(["tokenize", "--config", str(cfg), "--cache_dir", str(tmp_path / "file" / "cache")]) == 2
    err = capsys.readouterr().err
    assert f"error: cache_dir={tmp_path / 'file' / 'cache'} is not writable: Not a directory" in err
    assert "Traceback" not in err


def test_read_only_output_dir(setup, tmp_path, capsys):
    cfg, _ = setup
    target = tmp_path / "readonly"
    with mounted(target, "--bind", str(target)):
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True, text=True)
        assert remount.returncode == 0, remount.stderr
        for command in ("train", "run"):
            assert main([command, "--config", str(cfg), "--output_dir", str(target / "out")]) == 2
            err = capsys.readouterr().err
            assert f"error: output_dir={target / 'out'} is not writable: Read-only file system" in err, err
            assert "Traceback" not in err


# --- full ---


def fill(mount: Path) -> None:
    """Write until the filesystem is full (ENOSPC), so the next data write fails."""
    with contextlib.suppress(OSError), (mount / ".filler").open("wb") as fh:
        while True:
            fh.write(b"\0" * 4096)
            fh.flush()


def test_full_disk_while_tokenizing(ray_session, setup, tmp_path, capsys):
    """Stage 1's Parquet is written by Ray Data workers: their ENOSPC reaches the user as one clear line."""
    cfg, config = setup
    tokenized = Path(config["cache_dir"]) / "tokenized"
    with mounted(tokenized, "-t", "tmpfs", "-o", "size=64k", "tmpfs"):
        fill(tokenized)
        assert main(["tokenize", "--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert f"error: cannot write {tokenized}/" in err and "No space left on device" in err, err[-2000:]
        # Ray Data's own logger may print the failed write task's traceback first (it depends on how logging
        # was set up earlier in the process); the CLI's last word is the one clear line.
        assert err.strip().splitlines()[-1].startswith(f"error: cannot write {tokenized}/"), err[-2000:]
        assert manifests(tokenized) == []
        assert not [p for p in tokenized.iterdir() if p.name != ".filler"]  # the temporary entry was removed
        with pytest.raises(CacheError, match="no cache entry"):
            find_tokenized(load_config(cfg), tuple(config["dataset"]))


def test_full_disk_while_scoring_then_rerun(ray_session, setup, capsys):
    """Stage 2's shards are written by the driver: the entry stays unfinished (never valid), and once there
    is space again a rerun completes it."""
    cfg, config = setup
    assert main(["tokenize", "--config", str(cfg)]) == 0
    reference = Path(config["cache_dir"]) / "reference"
    with mounted(reference, "-t", "tmpfs", "-o", "size=4k", "tmpfs"):  # one page: the plan fits, a shard not
        assert main(["score-ref", "--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert "/shard-00000.parquet: No space left on device" in err and "error: cannot write" in err, err[-2000:]
        assert err.strip().splitlines()[-1].startswith("error: cannot write"), err[-2000:]  # as above
        assert manifests(reference) == []
        entry = next(reference.iterdir())
        assert [p.name for p in entry.iterdir()] == ["plan.json"]  # no half-written shard left
        loaded = load_config(cfg)
        with pytest.raises(CacheError, match="incomplete"):
            find_reference(loaded, find_tokenized(loaded, tuple(config["dataset"])))
    assert main(["score-ref", "--config", str(cfg)]) == 0  # space again (the tmpfs is gone)
    loaded = load_config(cfg)
    assert find_reference(loaded, find_tokenized(loaded, tuple(config["dataset"]))).manifest["rows"] == 12


# --- Ctrl-C ---


def started_by(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries `marker`: the driver and everything it started, however
    re-parented (Ray's processes inherit the driver's environment)."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get("DPO_TEST_MARKER") == marker and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_a_rerun_resumes(setup, tmp_path):
    cfg, config = setup
    out = Path(config["output_dir"])
    config |= {
        "max_steps": 40,
        "save_steps": 2,
        "logging_steps": 1,
        "per_device_train_batch_size": 4,
        "zero_stage": 0,
        "gradient_checkpointing": False,
        "learning_rate": 1e-3,
        "run_name": "ctrlc",
    }
    cfg.write_text(json.dumps(config))
    marker = uuid.uuid4().hex
    env = {**os.environ, "RAY_ADDRESS": "", "DPO_TEST_MARKER": marker}
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", str(cfg)]
    log = tmp_path / "first.log"
    with log.open("w") as fh:
        driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        metrics = out / "metrics.jsonl"
        # Ray Train resumes from the checkpoints its controller has registered (in this snapshot): wait for one
        registered = out / "ray" / "ctrlc" / "checkpoint_manager_snapshot.json"
        while not registered.exists():
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, f"no training after 300 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        before = started_by(marker)
        assert len(before) >= 3, before  # the driver, Ray's own processes, the training worker
        driver.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        assert driver.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    assert "interrupted; rerun the same command to resume" in log.read_text()
    steps_done = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert max(steps_done) < 40, "the run finished before the interrupt: nothing was tested"
    deadline = time.time() + 30
    while started_by(marker) and time.time() < deadline:
        time.sleep(0.5)
    assert started_by(marker) == [], [p.cmdline()[:3] for p in started_by(marker)]  # no orphans

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    text = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, text[-3000:]
    assert "reusing cached tokenized data" in text and "reusing cached reference scores" in text
    resumed = int(text.split("resumed from step ")[1].split()[0])
    assert resumed >= 2 and resumed % 2 == 0
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 41))  # every step exactly once
