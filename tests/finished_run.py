"""One finished `dpo-pipeline run`, started as a user starts it, whose outputs the report, console and
generation tests read (the `finished_run` fixture in conftest.py builds it once per test session)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import yaml
from colour_pairs import TRAIN_ROWS

RUN_STEPS = 6
RUN_EVAL_STEPS = 2
RUN_NEW_TOKENS = 6  # max_new_tokens
RUN_EVAL_PROMPTS = 12
JUDGES = '''
def shorter_wins(prompt: str, reference: str, policy: str) -> float:
    """1 when the policy's answer is shorter, 0 when longer, 0.5 on a tie."""
    return 0.5 if len(policy) == len(reference) else float(len(policy) < len(reference))


def broken(prompt: str, reference: str, policy: str) -> float:
    return 2.0
'''


@dataclass(frozen=True)
class FinishedRun:
    root: Path  # the judges module, the inputs and config.yaml; the working directory of the run
    config: Path
    cfg: dict
    out: Path  # output_dir
    returncode: int
    stdout: str
    stderr: str


def run_once(root: Path, model_dir: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "judges.py").write_text(textwrap.dedent(JUDGES))
    # the stage-3 tests' 32 pairs, and two that are dropped: a duplicate, and identical completions
    train = [*TRAIN_ROWS, TRAIN_ROWS[0], {"prompt": "Say it:", "chosen": " same", "rejected": " same"}]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    cfg = {
        "model": str(model_dir),
        "cache_dir": str(root / "cache"),
        "output_dir": str(root / "run"),
        "run_name": "finished",
        "dataset": [str(root / "train.jsonl")],
        "eval_dataset": [f"builtin:demo-test-text:{RUN_EVAL_PROMPTS}"],
        "max_steps": RUN_STEPS,
        "learning_rate": 1e-3,
        "warmup_steps": 1,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 5,  # 3 generation batches of 5, 5 and 2 prompts
        "logging_steps": 1,
        "eval_steps": RUN_EVAL_STEPS,
        "save_steps": 100,
        "zero_stage": 0,
        "gradient_checkpointing": False,
        "report_to": ["mlflow"],  # mlflow-skinny is a pinned dev dependency
        "max_new_tokens": RUN_NEW_TOKENS,
        "report_samples": 4,
        "judge": "judges:shorter_wins",  # importable from the run's working directory
    }
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # MLflow's default: under output_dir
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--config", str(root / "config.yaml")],
        cwd=root,
        env={**env, "RAY_ADDRESS": "local"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    done = {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
    (root / "finished.json").write_text(json.dumps(done))
