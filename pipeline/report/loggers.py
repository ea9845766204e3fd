"""Optional experiment loggers beside the built-in TensorBoard events: Weights & Biases and MLflow.

    report_to: [wandb]    # WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE as usual; WANDB_MODE=offline never connects
    report_to: [mlflow]   # MLFLOW_TRACKING_URI, else a local store in <output_dir>/mlruns

Nothing is imported, created or contacted unless `report_to` names it. The driver resolves where each logger
goes and checks that its package is installed (`resolve_loggers`), before any training; rank 0 alone opens
them (`open_loggers`). Metric names are those transformers' callbacks use: W&B and TensorBoard get
`train/loss`, `eval/loss`, ...; MLflow gets the metrics.jsonl names `loss`, `eval_loss`, ...
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.progress import eta_text
from pipeline.rundir import METRICS, TENSORBOARD
from pipeline.uris import redact_uri

EXTERNAL = ("wandb", "mlflow")
PIP_NAMES = {"wandb": "wandb", "mlflow": "mlflow-skinny (or mlflow)"}


def tracker_name(key: str) -> str:
    """metrics.jsonl key -> TensorBoard / W&B name, as transformers' `rewrite_logs`: eval_x -> eval/x, x -> train/x."""
    return "eval/" + key[len("eval_") :] if key.startswith("eval_") else "train/" + key


# --- driver: where each requested logger goes ---


@dataclass(frozen=True)
class LoggerSpec:
    """Settings of the requested loggers, read from the driver's environment (Ray workers on other nodes do not
    share it). Secrets (WANDB_API_KEY, MLflow credentials) are not copied: the workers' environment supplies them."""

    wandb: dict[str, str | None] | None = None  # wandb.init keyword arguments
    mlflow: dict[str, str | None] | None = None  # tracking_uri, experiment, run_name

    def describe(self) -> dict[str, str]:
        """Where each logger writes, safe to print and to store in train_summary.json."""
        out = {}
        if self.wandb is not None:
            w = self.wandb
            out["wandb"] = f"project {w['project']}, run {w['name']}, mode {w['mode'] or 'online'}"
        if self.mlflow is not None:
            m = self.mlflow
            out["mlflow"] = (
                f"{redact_uri(m['tracking_uri'] or '')}, experiment {m['experiment'] or 'Default'}, run {m['run_name']}"
            )
        return out


def requested(cfg: Config) -> tuple[str, ...]:
    return tuple(name for name in cfg.train.report_to if name in EXTERNAL)


def resolve_loggers(cfg: Config) -> LoggerSpec:
    """The requested loggers' settings; ConfigError if a requested package is not installed."""
    names = requested(cfg)
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise ConfigError(
            "report_to names "
            + ", ".join(missing)
            + " but the package is not installed: pip install "
            + " ".join(PIP_NAMES[n] for n in missing)
            + ", or remove it from report_to."
        )
    out_dir = Path(cfg.data.output_dir).expanduser()
    wandb = mlflow = None
    if "wandb" in names:
        wandb = {
            "project": os.environ.get("WANDB_PROJECT") or "dpo-pipeline",
            "entity": os.environ.get("WANDB_ENTITY"),
            "mode": os.environ.get("WANDB_MODE"),
            "name": cfg.scale.run_name,
            "dir": str(out_dir),
        }
    if "mlflow" in names:
        mlflow = {
            "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI") or (out_dir / "mlruns").as_uri(),
            "experiment": os.environ.get("MLFLOW_EXPERIMENT_NAME"),
            "run_name": cfg.scale.run_name,
        }
    return LoggerSpec(wandb=wandb, mlflow=mlflow)


# --- rank 0: the loggers themselves ---


class ExperimentLogger(Protocol):
    def log(self, values: dict[str, float], step: int) -> None:
        """One metrics.jsonl line's values (keys as in metrics.jsonl, without `step`)."""

    def close(self) -> None: ...


def open_loggers(spec: LoggerSpec, cfg: Config) -> list[ExperimentLogger]:
    """Start one run per requested logger, with the effective config as its parameters."""
    out: list[ExperimentLogger] = []
    if spec.wandb is not None:
        out.append(WandbLogger(spec.wandb, cfg.flat()))
    if spec.mlflow is not None:
        out.append(MLflowLogger(spec.mlflow, cfg.flat()))
    return out


def _finite(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


class WandbLogger:
    """A W&B run; WANDB_MODE (online, offline, disabled) is W&B's own switch and is passed through."""

    def __init__(self, settings: dict[str, str | None], params: dict[str, Any]):
        import wandb

        self.run = wandb.init(**{k: v for k, v in settings.items() if v is not None}, config=params)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({tracker_name(k): v for k, v in _finite(values).items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowLogger:
    """An MLflow run in the named tracking store, via MlflowClient (no global active run).

    MLflow's own usage telemetry is switched off unless MLFLOW_DISABLE_TELEMETRY is set: the only place
    contacted is the tracking store named. The local file store is in maintenance mode in MLflow 3 and has
    to be allowed explicitly (MLFLOW_ALLOW_FILE_STORE); a database store needs the full `mlflow` package."""

    def __init__(self, settings: dict[str, str | None], params: dict[str, Any]):
        uri = settings["tracking_uri"] or ""
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when mlflow is imported
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=uri)
        name = settings["experiment"] or "Default"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=settings["run_name"]).info.run_id
        items = [Param(k, str(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in _finite(values).items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


# --- rank 0: the metrics of a run ---


class MetricsLog:
    """metrics.jsonl (one line per logging step, each step once even after a resume), TensorBoard, the
    optional experiment loggers and a console line with progress and ETA. Only rank 0 makes one."""

    def __init__(self, output_dir: str, start_step: int, total_steps: int, loggers: Sequence[ExperimentLogger] = ()):
        self.dir = Path(output_dir).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / METRICS
        kept = []
        if start_step > 0 and self.path.exists():  # drop lines written after the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.dir / TENSORBOARD), purge_step=start_step + 1 if start_step else None)
        self.loggers = list(loggers)
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.time()

    def write(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        record = {"step": step, **{f"{prefix}{k}": v for k, v in values.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        logged = {k: v for k, v in record.items() if k != "step"}
        for k, v in logged.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(tracker_name(k), v, step)
        self.tb.flush()
        for logger in self.loggers:
            logger.log(logged, step)
        print(self._console(step, values, prefix), flush=True)

    def _console(self, step: int, v: dict[str, float], prefix: str) -> str:
        if prefix:
            return (
                f"[eval] step {step}: loss {v['loss']:.4f} | reward acc {v['rewards/accuracies']:.3f} | "
                f"margin {v['rewards/margins']:.4f}"
            )
        done = step - self.start_step
        rate = done / (time.time() - self.t0) if done else 0.0
        eta = (self.total - step) / rate if rate else float("nan")
        return (
            f"[train] step {step}/{self.total} ({100 * step / self.total:.0f}%) epoch {v['epoch']:.2f} | "
            f"loss {v['loss']:.4f} | reward acc {v['rewards/accuracies']:.3f} | margin "
            f"{v['rewards/margins']:.4f} | {v.get('pairs_per_second', 0.0):.2f} pairs/s | ETA {eta_text(eta)}"
        )

    def close(self) -> None:
        self.tb.close()
        for logger in self.loggers:
            logger.close()
