"""Faults around the stages: output locations that cannot be written or are full, and Ctrl-C on the driver.

(A training worker SIGKILLed mid-run and a rerun that resumes: tests/test_stage3_train.py. A scoring driver
killed, then a rerun of the missing shards, and a scoring actor killed while the job runs:
tests/test_stage2_score_ref.py.)

"Unwritable" and "full" are real filesystem conditions, not mocks, and each has a variant that needs no
privileges, so that every machine runs it:
- unwritable: a path under a regular file (ENOTDIR); a directory of mode 0o555 (EACCES), written by a thread
  without CAP_DAC_OVERRIDE (root's way past permissions; a user has none to drop); a read-only bind mount
  (EROFS, needs CAP_SYS_ADMIN).
- full: a file size limit (RLIMIT_FSIZE: a write past it fails with EFBIG, "File too large", since Python
  ignores SIGXFSZ), on the driver or on the Ray workers that write; a tiny tmpfs (ENOSPC, needs
  CAP_SYS_ADMIN).
Without CAP_SYS_ADMIN the mount variants skip and say so.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pipeline.config import load_config
from pipeline.data.entries import find_reference, find_tokenized
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


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


CAP_DAC_OVERRIDE = 1  # <linux/capability.h>: write (and read) whatever the permission bits say


@contextlib.contextmanager
def permissions_apply() -> Iterator[None]:
    """For this thread, permission bits bind as they do for an ordinary user: CAP_DAC_OVERRIDE is dropped from
    the effective capabilities (it stays permitted, so it is restored after). A no-op without it."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3; pid 0: the calling thread

    def caps(call: str, data: ctypes.Array[_CapData]) -> None:
        if getattr(libc, call)(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), f"{call} failed")

    data = (_CapData * 2)()
    caps("capget", data)
    saved = data[0].effective
    data[0].effective &= ~(1 << CAP_DAC_OVERRIDE)
    caps("capset", data)
    try:
        yield
    finally:
        data[0].effective = saved
        caps("capset", data)


@contextlib.contextmanager
def read_only_dir(how: str, target: Path) -> Iterator[str]:
    """`target`, a directory in which nothing can be created; yields the reason the user is told."""
    target.mkdir()
    if how == "permissions":  # no privileges needed
        target.chmod(0o555)
        try:
            with permissions_apply():
                yield "Permission denied"
        finally:
            target.chmod(0o755)
    else:
        with mounted(target, "--bind", str(target)):
            remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True, text=True)
            assert remount.returncode == 0, remount.stderr
            yield "Read-only file system"


@pytest.mark.parametrize("how", ["permissions", "mount"])
def test_read_only_output_dir(setup, tmp_path, capsys, how):
    cfg, _ = setup
    target = tmp_path / "readonly"
    with read_only_dir(how, target) as reason:
        for command in ("train", "run"):
            status = main([command, "--config", str(cfg), "--output_dir", str(target / "out")])
            err = capsys.readouterr().err
            assert f"error: output_dir={target / 'out'} is not writable: {reason}" in err, err
            assert status == 2
            assert "Traceback" not in err
    assert list(target.iterdir()) == []


# --- full ---


def fill(mount: Path) -> None:
    """Write until the filesystem is full (ENOSPC), so the next data write fails."""
    with contextlib.suppress(OSError), (mount / ".filler").open("wb") as fh:
        while True:
            fh.write(b"\0" * 4096)
            fh.flush()


FSIZE_LIMIT = 1024  # bytes: a plan, a claim, a digest memo fit under it; a Parquet file (schema, footer) does not


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """This process's writes past `limit` bytes of a file fail with EFBIG. Any user may lower the soft limit,
    and raise it back up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def assert_tokenize_failed_cleanly(err: str, cfg: Path, config: dict, reason: str) -> None:
    """One clear line names the entry, and no entry is left: nothing half-written, nothing a later command
    could take for data."""
    tokenized = Path(config["cache_dir"]) / "tokenized"
    assert f"error: cannot write {tokenized}/" in err and reason in err, err[-2000:]
    # Ray Data's own logger may print the failed write task's traceback first (it depends on how logging
    # was set up earlier in the process); the CLI's last word is the one clear line.
    assert err.strip().splitlines()[-1].startswith(f"error: cannot write {tokenized}/"), err[-2000:]
    assert manifests(tokenized) == []
    assert not [p for p in tokenized.iterdir() if p.name != ".filler"]  # the temporary entry was removed
    with pytest.raises(CacheError, match="no cache entry"):
        find_tokenized(load_config(cfg), tuple(config["dataset"]))


def test_full_disk_while_tokenizing(ray_session, setup, tmp_path, capsys):
    """Stage 1's Parquet is written by Ray Data workers: their ENOSPC reaches the user as one clear line."""
    cfg, config = setup
    tokenized = Path(config["cache_dir"]) / "tokenized"
    with mounted(tokenized, "-t", "tmpfs", "-o", "size=64k", "tmpfs"):
        fill(tokenized)
        assert main(["tokenize", "--config", str(cfg)]) == 2
        assert_tokenize_failed_cleanly(capsys.readouterr().err, cfg, config, "No space left on device")


# Stage 1 with a driver of its own, whose Ray workers (they write the Parquet) start with a file size limit.
# Their output goes to /dev/null, which no limit applies to: else Ray's writes to their logs would fail first.
LIMITED_WORKERS = f"""
import os, resource, sys
import ray
from stages.cli import main

def limit_file_size():
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, ({FSIZE_LIMIT}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
         runtime_env={{"worker_process_setup_hook": limit_file_size}})
sys.exit(main(sys.argv[1:]))
"""


def test_file_size_limit_while_tokenizing(setup):
    """As above, without privileges: the workers' Parquet writes fail with EFBIG past the limit."""
    cfg, config = setup
    cmd = [sys.executable, "-c", LIMITED_WORKERS, "tokenize", "--config", str(cfg)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.stdout + done.stderr)[-3000:]
    assert_tokenize_failed_cleanly(done.stderr, cfg, config, "File too large")


@contextlib.contextmanager
def disk_full(how: str, reference: Path) -> Iterator[str]:
    """Small files still fit but a shard under `reference` does not; yields the reason the user is told."""
    if how == "fsize":  # no privileges needed; the limit is on this process (the driver writes the shards)
        # Ray Data's log files, which this process appends to, are silenced meanwhile: they would fail first.
        ray_data = logging.getLogger("ray.data")
        level = ray_data.level
        ray_data.setLevel(logging.CRITICAL)
        try:
            with file_size_limit(FSIZE_LIMIT):
                yield "File too large"
        finally:
            ray_data.setLevel(level)
    else:
        # two pages: the entry's claim and its plan fit, a shard does not
        with mounted(reference, "-t", "tmpfs", "-o", "size=8k", "tmpfs"):
            yield "No space left on device"


@pytest.mark.parametrize("how", ["fsize", "tmpfs"])
def test_full_disk_while_scoring_then_rerun(ray_session, setup, capsys, how):
    """Stage 2's shards are written by the driver: the entry stays unfinished (never valid), and once there
    is space again a rerun completes it."""
    cfg, config = setup
    assert main(["tokenize", "--config", str(cfg)]) == 0
    reference = Path(config["cache_dir"]) / "reference"
    with disk_full(how, reference) as reason:
        assert main(["score-ref", "--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert f"/shard-00000.parquet: {reason}" in err and "error: cannot write" in err, err[-2000:]
        assert err.strip().splitlines()[-1].startswith("error: cannot write"), err[-2000:]  # as above
        assert manifests(reference) == []
        entry = next(reference.iterdir())
        assert [p.name for p in entry.iterdir()] == ["plan.json"]  # no half-written shard left
        loaded = load_config(cfg)
        with pytest.raises(CacheError, match="incomplete"):
            find_reference(loaded, find_tokenized(loaded, tuple(config["dataset"])))
    assert main(["score-ref", "--config", str(cfg)]) == 0  # space again (the limit or the tmpfs is gone)
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
    env = {**os.environ, "RAY_ADDRESS": "local", "DPO_TEST_MARKER": marker}
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

    # the rerun saves only at the end: a change that does not alter the run (one checkpoint instead of ~19)
    rerun = subprocess.run([*cmd, "--save_steps", "40"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    text = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, text[-3000:]
    assert "reusing cached tokenized data" in text and "reusing cached reference scores" in text
    assert "resuming with changed settings that do not alter the run: save_steps 2 -> 40" in text
    resumed = int(text.split("resumed from step ")[1].split()[0])
    assert resumed >= 2 and resumed % 2 == 0
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 41))  # every step exactly once
