"""The run report, built from one real small run (conftest's `finished_run`: `dpo-pipeline run` in a subprocess, as
a user starts it; tiny random Llama, 34 input rows of which 2 are dropped, 12 eval pairs, 6 steps, ZeRO-0, MLflow).

Checked: the run ends by writing the report; stages 1-2 log Ray Data progress into the run's log file and
training prints its progress line; every plot is a PNG that decodes, with the series expected from
metrics.jsonl; the numbers the report states are those of metrics.jsonl, train_summary.json, the data reports
and the reference cache; MLflow received the same metrics under their metrics.jsonl names, in its default store
under the run directory.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from finished_run import RUN_EVAL_PROMPTS, RUN_EVAL_STEPS, RUN_STEPS

from pipeline.console import LOG_FILE
from pipeline.report.plots import CURVES, ema
from pipeline.report.run_report import TABLE_METRICS, write_report
from pipeline.train.engine import gradient_norm
from stages.cli import build_parser, main

STEPS, EVAL_STEPS, EVAL_PAIRS = RUN_STEPS, RUN_EVAL_STEPS, RUN_EVAL_PROMPTS
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(finished_run, tmp_path_factory):
    """(a copy of the finished run's output_dir, which the tests below write reports into; the finished run;
    its metrics.jsonl lines)."""
    assert finished_run.returncode == 0, finished_run.stderr[-3000:]
    out = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(finished_run.out, out)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, finished_run, lines


def train_lines(lines):
    return [x for x in lines if "loss" in x]


def eval_lines(lines):
    return [x for x in lines if "eval_loss" in x]


# --- the run ---


def test_run_writes_report_and_shows_progress(run):
    out, proc, lines = run
    assert f"[report] {proc.out / 'report.md'}" in proc.stdout
    assert (out / "report.md").is_file()
    # Ray Data progress of stage 1 (the tokenizing tasks) and stage 2 (the reference pool): Ray logs them as
    # "operator: done/total" lines, into the run's log file (pipeline.console)
    log = (out / LOG_FILE).read_text()
    assert re.search(r"MapBatches\(_tokenize_rows\)\S*: \d+/\d+", log)
    assert re.search(r"MapBatches\(_ScoreRef\)\S*: \d+/\d+", log)
    last = re.search(
        r"\[train\] step 6/6 \(100%\) epoch [\d.]+ \| loss ([\d.]+) \| reward acc ([\d.]+) \| margin "
        r"\S+ \| [\d.]+ pairs/s \| ETA \d+m\d\ds",
        proc.stdout,
    )
    assert last, proc.stdout[-2000:]
    final = train_lines(lines)[-1]
    assert float(last.group(1)) == pytest.approx(final["loss"], abs=5e-5)
    assert float(last.group(2)) == pytest.approx(final["rewards/accuracies"], abs=5e-4)


def test_grad_norm_is_logged_at_zero_stage_0(run):
    norms = [x["grad_norm"] for x in train_lines(run[2])]
    assert len(norms) == STEPS and all(math.isfinite(n) and n > 0 for n in norms)


# --- the plots ---


def test_every_plot_is_a_png_with_the_expected_series(run):
    import matplotlib.image

    out, _, lines = run
    report = write_report(out)
    n_train, n_eval = len(train_lines(lines)), len(eval_lines(lines))
    assert (n_train, n_eval) == (STEPS, STEPS // EVAL_STEPS + 1)  # eval at step 0, every 2 steps and at the end
    expected = {}
    for file, _, _, metrics in CURVES:
        expected[file] = {
            **{f"train {m} (raw)": n_train for m in metrics},
            **{f"train {m} (EMA)": n_train for m in metrics},
            **{f"eval {m}": n_eval for m in metrics},
        }
    expected["optimizer.png"] = {
        "learning_rate": n_train,
        "train grad_norm (raw)": n_train,
        "train grad_norm (EMA)": n_train,
    }
    expected["ref_margins.png"] = {"train (32 pairs)": 32, f"eval ({EVAL_PAIRS} pairs)": EVAL_PAIRS}

    assert {p.file: {s.name: s.points for s in p.series} for p in report.plots} == expected
    assert sorted(f.name for f in (out / "plots").iterdir()) == sorted(expected)
    for p in report.plots:
        path = out / "plots" / p.file
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        height, width, channels = image.shape
        assert width >= 900 and height >= 500 and channels in (3, 4)
        assert float(np.std(image[..., :3])) > 0.01  # not a blank canvas
        assert p.title


def test_ema_worked_by_hand():
    # span 3: alpha = 0.5. Step 1: 0.5*0 / 0.5 = 0. Step 2: (0.25*0 + 0.5*1) / (0.25 + 0.5) = 2/3.
    # Step 3: (0.5*0.5 + 0.5*1) / (0.5*0.75 + 0.5) = 0.75 / 0.875 = 6/7
    assert ema(np.array([0.0, 1.0, 1.0]), span=3) == pytest.approx([0.0, 2 / 3, 6 / 7])


def test_gradient_norm_is_the_l2_norm_of_all_gradients():
    module = torch.nn.Linear(2, 2)
    module.weight.grad = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    module.bias.grad = torch.tensor([12.0, 0.0])
    assert gradient_norm(module) == pytest.approx(13.0)  # sqrt(9 + 16 + 144)


# --- the numbers in report.md ---


def table_row(text: str, first_cell: str) -> list[str]:
    row = next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))
    return [c.strip() for c in row.strip("|").split("|")][1:]


def close(cell: str, value: float) -> bool:
    return math.isclose(float(cell), value, rel_tol=6e-4, abs_tol=1e-12)  # 4 significant digits


def test_report_states_the_numbers_of_the_run(run):
    out, _, lines = run
    write_report(out)
    text = (out / "report.md").read_text()
    train, evals = train_lines(lines), eval_lines(lines)
    assert table_row(text, "metric") == [
        f"train, first (step {train[0]['step']})",
        f"train, last (step {train[-1]['step']})",
        "eval, first (step 0)",
        f"eval, last (step {STEPS})",
    ]
    for metric in TABLE_METRICS:
        cells = table_row(text, metric)
        expected = [train[0][metric], train[-1][metric]]
        if f"eval_{metric}" in evals[0]:
            expected += [evals[0][f"eval_{metric}"], evals[-1][f"eval_{metric}"]]
        else:
            assert cells[2:] == ["–", "–"]
        assert all(close(c, v) for c, v in zip(cells, expected)), (metric, cells, expected)

    summary = json.loads((out / "train_summary.json").read_text())
    assert table_row(text, "optimizer steps") == [str(STEPS)]
    pairs_s, tokens_s = re.search(r"\| throughput \| (\S+) pairs/s, (\S+) tokens/s", text).groups()
    assert close(pairs_s, summary["train_samples_per_second"]) and close(tokens_s, summary["train_tokens_per_second"])
    memory = re.search(r"\| peak memory, rank 0 \| (\S+) GB", text).group(1)
    assert close(memory, summary["peak_memory_bytes"] / 1e9)

    # data reports: 34 rows read, 2 dropped for the reasons planted in the fixture
    data = json.loads((out / "data_report.json").read_text())
    assert (data["rows_read"], data["pairs_kept"], data["dropped"]) == (
        34,
        32,
        {"duplicate_pair": 1, "identical_completions": 1},
    )
    train_data = text[text.index("### train\n") : text.index("### eval\n")]
    assert table_row(train_data, "read") == ["34"] and table_row(train_data, "kept (pairs)") == ["32"]
    assert table_row(train_data, "dropped: duplicate_pair") == ["1"]
    assert table_row(train_data, "dropped: identical_completions") == ["1"]
    assert table_row(text[text.index("### eval\n") :], "kept (pairs)") == [str(EVAL_PAIRS)]

    # reference margins: recomputed here from the cache entry's Parquet files
    ref_dir = Path(summary["inputs"]["train"]["reference"])
    table = pq.read_table(sorted(ref_dir.glob("*.parquet")))
    margins = table.column("ref_chosen_logps").to_numpy() - table.column("ref_rejected_logps").to_numpy()
    mean, median = re.search(
        rf"- train: `{re.escape(str(ref_dir))}`: 32 pairs; .* mean (\S+), median (\S+) nats", text
    ).groups()
    assert close(mean, float(np.mean(margins))) and close(median, float(np.median(margins)))

    config = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert config == summary["config"]


def test_report_on_a_run_without_summary_eval_or_data_reports(tmp_path):
    """An unfinished run without eval set: only metrics.jsonl. The report says what is missing."""
    rows = [{"step": s, "epoch": s / 4, "loss": 0.7 - 0.01 * s, "rewards/accuracies": 0.5} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(tmp_path)
    text = report.path.read_text()
    for said in (
        "No train_summary.json",
        "No eval line in metrics.jsonl",
        "No data report",
        "the cache entries used are not recorded",
        "Not recorded",
    ):
        assert said in text
    loss = next(p for p in report.plots if p.file == "loss.png")
    assert {s.name: s.points for s in loss.series} == {"train loss (raw)": 3, "train loss (EMA)": 3}
    assert table_row(text, "loss") == ["0.69", "0.67"] and table_row(text, "rewards/accuracies") == ["0.5", "0.5"]
    assert not (tmp_path / "plots" / "ref_margins.png").exists()


# --- the command ---


def test_report_command(run, tmp_path, capsys):
    out = run[0]
    assert main(["report", str(out)]) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path} is not a run directory: metrics.jsonl is missing "
        "(`dpo-pipeline train` writes it into output_dir)"
    )
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["report", "--help"])
    assert "RUN_DIR/report.md" in capsys.readouterr().out


# --- MLflow, from the same run ---


def test_mlflow_received_the_metrics(run, monkeypatch):
    from mlflow import MlflowClient

    _, finished, lines = run
    out = finished.out
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("Default")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "finished" and found.info.status == "FINISHED"
    assert found.data.params["beta"] == "0.1" and found.data.params["loss_type"] == "['sigmoid']"

    def history(key):
        return [
            (m.step, m.value) for m in sorted(client.get_metric_history(found.info.run_id, key), key=lambda m: m.step)
        ]

    for key in ("loss", "rewards/accuracies", "rewards/margins", "grad_norm", "learning_rate"):
        assert history(key) == [(x["step"], pytest.approx(x[key], rel=1e-12)) for x in train_lines(lines)]
    for key in ("eval_loss", "eval_rewards/accuracies"):
        assert history(key) == [(x["step"], pytest.approx(x[key], rel=1e-12)) for x in eval_lines(lines)]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["loggers"]["mlflow"].startswith((out / "mlruns").as_uri())
