"""Experiment loggers (`report_to`) and the training console line, without a training run.

Nothing is imported or written unless named; a requested package that is missing is a ConfigError before any
work; MLflow (real, local file store) and W&B (a stand-in module: see test_wandb_logger) receive each
metrics line under transformers' names. The real run in test_report.py checks MLflow end to end.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import sys
import types

import pytest

from pipeline.config import config_from_dict
from pipeline.errors import ConfigError
from pipeline.report.loggers import MetricsLog, open_loggers, resolve_loggers
from pipeline.uris import redact_uri
from stages.cli import main

TRAIN = {
    "loss": 0.65,
    "rewards/accuracies": 0.75,
    "rewards/margins": 0.125,
    "grad_norm": float("nan"),
    "learning_rate": 1e-4,
    "epoch": 0.5,
    "pairs_per_second": 1.5,
}
EVAL = {"loss": 0.6, "rewards/accuracies": 0.5, "rewards/margins": 0.25}


def test_report_to_values():
    assert config_from_dict({}).train.report_to == ("none",)  # as transformers 5: no external logger by default
    assert config_from_dict({"report_to": "wandb,mlflow"}).train.report_to == ("wandb", "mlflow")
    with pytest.raises(
        ConfigError,
        match=r"report_to='all' is not allowed: expected one of none, tensorboard, "
        r"wandb, mlflow",
    ):
        config_from_dict({"report_to": ["all"]})
    with pytest.raises(ConfigError, match=r"none alone"):
        config_from_dict({"report_to": ["none", "wandb"]})


def test_nothing_is_imported_or_written_unless_named(tmp_path, monkeypatch):
    for name in ("wandb", "mlflow"):  # any import of them now raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    for report_to in (["none"], ["tensorboard"], []):
        cfg = config_from_dict({"report_to": report_to, "output_dir": str(tmp_path)})
        spec = resolve_loggers(cfg)
        assert spec.wandb is None and spec.mlflow is None and spec.describe() == {}
        assert open_loggers(spec, cfg) == []
    cfg = config_from_dict({"output_dir": str(tmp_path)})
    log = MetricsLog(str(tmp_path), 0, 2, open_loggers(resolve_loggers(cfg), cfg))
    log.write(1, TRAIN)
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"]


def test_missing_package_is_a_config_error_before_any_work(tmp_path, monkeypatch, capsys):
    from stages.stage3_train import run_train

    for name in ("wandb", "mlflow"):  # as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    # the dataset does not exist: reaching it would be a DataError, so the ConfigError proves the order
    base = {"dataset": [str(tmp_path / "absent.jsonl")], "output_dir": str(tmp_path / "out")}
    with pytest.raises(
        ConfigError,
        match=r"report_to names wandb, mlflow but the package is not installed: pip "
        r"install wandb mlflow-skinny \(or mlflow\)",
    ):
        run_train(config_from_dict({**base, "report_to": ["wandb", "mlflow"]}))
    assert (
        main(
            [
                "run",
                "--dataset",
                str(tmp_path / "absent.jsonl"),
                "--output_dir",
                str(tmp_path / "out"),
                "--report_to",
                "mlflow",
            ]
        )
        == 2
    )
    assert "report_to names mlflow but the package is not installed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_redact_uri():
    assert (
        redact_uri("https://user:s3cret@mlflow.example.com:5000/x?token=abc#f")
        == "https://***@mlflow.example.com:5000/x?***#f"
    )
    assert redact_uri("file:///runs/demo/mlruns") == "file:///runs/demo/mlruns"
    assert redact_uri("databricks") == "databricks"


def test_wandb_logger(tmp_path, monkeypatch):
    """Against a stand-in `wandb` module that records calls: the real package is not a dependency (see README).
    Checks what we pass to wandb.init and the names and steps we log, i.e. transformers' W&B names."""
    calls: dict = {"log": []}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    cfg = config_from_dict({"report_to": ["wandb"], "output_dir": str(tmp_path), "run_name": "sweep-1"})
    spec = resolve_loggers(cfg)
    assert spec.describe() == {"wandb": "project my-project, run sweep-1, mode offline"}
    log = MetricsLog(str(tmp_path), 0, 4, open_loggers(spec, cfg))
    log.write(2, TRAIN)
    log.write(2, EVAL, prefix="eval_")
    log.close()
    assert calls["init"] == {
        "project": "my-project",
        "mode": "offline",
        "name": "sweep-1",
        "dir": str(tmp_path),
        "config": cfg.flat(),
    }
    (step1, train), (step2, evals) = calls["log"]
    assert step1 == step2 == 2
    assert train == {
        "train/loss": 0.65,
        "train/rewards/accuracies": 0.75,
        "train/rewards/margins": 0.125,
        "train/learning_rate": 1e-4,
        "train/epoch": 0.5,
        "train/pairs_per_second": 1.5,
    }  # no NaN
    assert evals == {"eval/loss": 0.6, "eval/rewards/accuracies": 0.5, "eval/rewards/margins": 0.25}
    assert calls["finished"]


def test_mlflow_logger_local_store(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_DISABLE_TELEMETRY"):
        monkeypatch.delenv(name, raising=False)  # restored after the test, whatever the logger sets
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "dpo-sweep")
    cfg = config_from_dict({"report_to": ["mlflow"], "output_dir": str(tmp_path), "run_name": "beta-0.2", "beta": 0.2})
    spec = resolve_loggers(cfg)
    store = (tmp_path / "mlruns").as_uri()
    assert spec.mlflow == {"tracking_uri": store, "experiment": "dpo-sweep", "run_name": "beta-0.2"}
    log = MetricsLog(str(tmp_path), 0, 4, open_loggers(spec, cfg))
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"  # no usage reports to MLflow's servers
    log.write(1, TRAIN)
    log.write(2, {**TRAIN, "loss": 0.5})
    log.write(2, EVAL, prefix="eval_")
    log.close()

    client = MlflowClient(tracking_uri=store)
    (found,) = client.search_runs([client.get_experiment_by_name("dpo-sweep").experiment_id])
    assert found.info.run_name == "beta-0.2" and found.info.status == "FINISHED"
    assert found.data.params["beta"] == "0.2" and found.data.params["report_to"] == "['mlflow']"
    history = {
        k: sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, k))
        for k in ("loss", "eval_loss", "rewards/margins", "eval_rewards/margins", "grad_norm")
    }
    assert history == {
        "loss": [(1, 0.65), (2, 0.5)],
        "eval_loss": [(2, 0.6)],
        "rewards/margins": [(1, 0.125), (2, 0.125)],
        "eval_rewards/margins": [(2, 0.25)],
        "grad_norm": [],
    }


def test_mlflow_destination_is_redacted(tmp_path, monkeypatch):
    stand_in = types.ModuleType("mlflow")  # resolving only checks that the package is there
    stand_in.__spec__ = importlib.machinery.ModuleSpec("mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow", stand_in)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://me:hunter2@mlflow.internal/?token=abc")
    cfg = config_from_dict({"report_to": ["mlflow"], "output_dir": str(tmp_path)})
    described = resolve_loggers(cfg).describe()["mlflow"]
    assert "hunter2" not in described and "abc" not in described and "mlflow.internal" in described


def test_training_console_line(tmp_path, capsys):
    log = MetricsLog(str(tmp_path), 0, 10)
    log.write(3, TRAIN)
    log.write(3, EVAL, prefix="eval_")
    log.close()
    train, evals = capsys.readouterr().out.splitlines()
    assert re.fullmatch(
        r"\[train\] step 3/10 \(30%\) epoch 0\.50 \| loss 0\.6500 \| reward acc 0\.750 \| margin "
        r"0\.1250 \| 1\.50 pairs/s \| ETA (\d+m\d\ds|\?)",
        train,
    ), train
    assert evals == "[eval] step 3: loss 0.6000 | reward acc 0.500 | margin 0.2500"
