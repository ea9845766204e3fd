"""The console shows the pipeline's own lines; Ray's, DeepSpeed's and the libraries' logs go to
<output_dir>/logs/pipeline.log (pipeline.console)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from finished_run import RUN_EVAL_PROMPTS, RUN_STEPS

from pipeline.console import LOG_FILE, for_console
from stages.cli import main

REPO = Path(__file__).resolve().parents[1]
# what Ray, Ray Data, Ray Train, DeepSpeed and transformers print in a run today (see the module docstring)
INTERNAL = (
    "logging_progress",
    "streaming_executor",
    "core_worker",
    "Token authentication",
    "real_accelerator",
    "deepspeed.ops",
    "Writing model shards",
    "Loading weights",
    "RayTrainWorker",
    "TrainController",
)
OURS = re.compile(r"\[[a-z-]+\] |held-out ")


def where(command: str, log: Path) -> str:
    """The console's first line: where the log file is."""
    return f"[{command}] Ray's, DeepSpeed's and the libraries' logs: {log} (--verbose shows them here)"


def test_forwarded_worker_lines_reach_the_console_only_when_they_are_the_pipelines():
    blue, reset = "\x1b[36m", "\x1b[0m"
    step = "[train] step 2/4 (50%) epoch 0.25 | loss 0.6932"
    assert for_console(f"{blue}(RayTrainWorker pid=17479){reset} {step}") == step
    assert for_console("(MapWorker(MapBatches(_ScoreRef)) pid=1, ip=10.0.0.2) [score-ref] kernels: x") == (
        "[score-ref] kernels: x"
    )
    ds = "[2026-12-01 04:37:20,666] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU."
    assert for_console(f"{blue}(RayTrainWorker pid=17479){reset} {ds}") is None
    assert for_console("(pid=12) DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully") is None
    unschedulable = "Warning: The following resource request cannot be scheduled right now: {'CPU': 4.0}."
    assert for_console(f"(autoscaler +1m2s) {unschedulable}") == unschedulable
    assert for_console("(autoscaler +1m2s) Tip: use `ray status` to view detailed cluster status.") is None
    assert for_console("held-out reward accuracy: 0.000 -> 0.438") == "held-out reward accuracy: 0.000 -> 0.438"
    assert for_console("[tokenize] train: 16 rows read") == "[tokenize] train: 16 rows read"
    assert for_console(ds) is None  # written on the driver itself: only the project's lines are the console's
    assert for_console("Loading checkpoint shards: 100%") is None


def test_a_library_imported_inside_the_console_logs_to_the_file(tmp_path):
    """DeepSpeed, imported on the driver inside the block (save_pretrained imports it when a builtin model is
    converted), gives its logger a handler to the stdout of that moment, the console's: its accelerator line
    goes to the log file, not to the console."""
    out = tmp_path / "out"
    code = (
        "from pipeline.console import open_console\n"
        f"with open_console({str(out)!r}, 'run'):\n"
        "    import deepspeed\n"
        "    print('[run] imported', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [where("run", out / LOG_FILE), "[run] imported"] and done.stderr == ""
    assert "real_accelerator" in (out / LOG_FILE).read_text()


@pytest.mark.slow
def test_run_console_shows_the_pipelines_lines_and_logs_the_rest(finished_run):
    """A real console: a `run` in its own process, which starts Ray itself (log_to_driver on), every stage."""
    console = finished_run.stdout + finished_run.stderr
    assert finished_run.returncode == 0, console[-3000:]
    assert finished_run.stderr == "", finished_run.stderr[-3000:]
    lines = console.splitlines()
    assert [x for x in lines if not OURS.match(x)] == []
    assert not [x for x in INTERNAL if x in console]
    assert not re.search("error|traceback|exception", console, re.I), console
    log = finished_run.out / LOG_FILE
    assert lines[0] == where("run", log)
    for said in (
        "[tokenize] train: 34 rows read",
        "[score-ref] train: scoring 32 pairs",
        f"[score-ref] eval: scoring {RUN_EVAL_PROMPTS} pairs",
        "[train] kernels:",
        "[eval] step 0:",
        f"[train] step {RUN_STEPS}/{RUN_STEPS} (100%)",
        f"[run] done: {RUN_STEPS} steps",
        "[generate] eval: policy done",
        f"[generate] eval: {RUN_EVAL_PROMPTS} prompts ->",
        "held-out reward accuracy:",
        "held-out answer accuracy:",
    ):
        assert said in console, said
    text = log.read_text()
    for internal in ("streaming_executor", "core_worker.cc", "(RayTrainWorker pid=", "real_accelerator"):
        assert internal in text, internal
    assert "\x1b[" not in text  # Ray's colors are for terminals


def test_in_a_ray_session_errors_stay_one_line_and_the_rest_is_logged(ray_session, tiny_model_dir, tmp_path, capfd):
    """Ray already running (log_to_driver off), as for a library caller: the same console, one error line."""
    bad = tmp_path / "pairs.parquet"
    bad.write_bytes(b"PAR1" + b"\x00" * 64)
    out = tmp_path / "out"
    rc = main(["tokenize", "--model", str(tiny_model_dir), "--dataset", str(bad),
               "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out)])  # fmt: skip
    captured = capfd.readouterr()
    assert rc == 2, captured.err[-3000:]
    said, started = captured.out.splitlines()
    assert said == where("tokenize", out / LOG_FILE)
    assert started.startswith(f"[tokenize] train: 1 file(s) -> {tmp_path / 'cache' / 'tokenized'}/")
    assert captured.err.splitlines() == [captured.err.strip()] and captured.err.startswith(f"error: {bad}")
    assert "streaming_executor" in (out / LOG_FILE).read_text()
    assert ray_session.is_initialized()  # the session's Ray is not the command's to stop
