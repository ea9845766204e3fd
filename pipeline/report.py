"""`dpo-pipeline report RUN_DIR`: report.md and PNG plots for a training run's output directory.

    dpo-pipeline report runs/demo     # writes runs/demo/report.md and runs/demo/plots/*.png

Everything comes from the run directory: metrics.jsonl, train_summary.json (throughput, memory, the effective
config and the cache entries used), data_report.json and eval_data_report.json; the margin histogram reads
the reference-cache entry that train_summary.json names. Only metrics.jsonl is required: anything else that
is missing (no eval set, a run that has not finished, a deleted cache entry) is stated in the report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline import plots, schema
from pipeline.config import config_fields
from pipeline.errors import PipelineError
from pipeline.loggers import redact_uri

METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"
REPORT = "report.md"
PLOTS_DIR = "plots"
DATA_REPORTS = {"train": "data_report.json", "eval": "eval_data_report.json"}
TABLE_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "entropy",
    "mean_token_accuracy",
    "grad_norm",
    "learning_rate",
)


def fmt(value: float) -> str:
    """How the report writes a measured number: 4 significant digits."""
    return f"{value:.4g}"


@dataclass(frozen=True)
class RunData:
    dir: Path
    train: list[dict[str, Any]]  # metrics.jsonl training lines
    evals: list[dict[str, Any]]  # eval lines, keys without the eval_ prefix
    summary: dict[str, Any] | None
    data_reports: dict[str, dict[str, Any]]  # split -> data report
    ref_margins: dict[str, np.ndarray]  # split -> reference log-prob margins, one per pair
    ref_notes: dict[str, str]  # split -> why its margins are missing

    @property
    def config(self) -> dict[str, Any]:
        return (self.summary or {}).get("config", {})


@dataclass(frozen=True)
class Report:
    path: Path
    plots: tuple[plots.Plot, ...]


# --- reading a run directory ---


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory; PipelineError if it is not one."""
    d = Path(run_dir).expanduser().resolve()
    if not d.is_dir():
        raise PipelineError(f"{run_dir}: no such directory")
    if not (d / METRICS).is_file():
        raise PipelineError(
            f"{run_dir} is not a run directory: {METRICS} is missing (`dpo-pipeline train` writes it into output_dir)"
        )
    train, evals = [], []
    for n, line in enumerate((d / METRICS).read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PipelineError(f"{d / METRICS}, line {n}: not JSON ({e.msg})") from None
        if "eval_loss" in record:
            evals.append({k.removeprefix("eval_"): v for k, v in record.items()})
        elif "loss" in record:
            train.append(record)
    if not train:
        raise PipelineError(f"{d / METRICS} has no training step yet: nothing to report")
    summary = json.loads((d / SUMMARY).read_text()) if (d / SUMMARY).is_file() else None
    data_reports = {
        split: json.loads((d / name).read_text()) for split, name in DATA_REPORTS.items() if (d / name).is_file()
    }
    margins, notes = _reference_margins((summary or {}).get("inputs"))
    return RunData(d, train, evals, summary, data_reports, margins, notes)


def _reference_margins(inputs: dict[str, Any] | None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """ref_chosen_logps − ref_rejected_logps of every pair, from the cache entries the run used."""
    if not inputs:
        return {}, {"train": f"the cache entries used are not recorded in {SUMMARY}"}
    import pyarrow.parquet as pq

    margins, notes = {}, {}
    for split in _splits(inputs):
        path = Path(inputs[split]["reference"])
        manifest = path / "manifest.json"
        if not manifest.is_file():
            notes[split] = f"the reference cache entry {path} no longer exists"
            continue
        files = sorted(json.loads(manifest.read_text())["files"])
        table = pq.ParquetDataset([str(path / f) for f in files]).read(
            columns=[schema.REF_CHOSEN_LOGPS, schema.REF_REJECTED_LOGPS]
        )
        margins[split] = (
            table.column(schema.REF_CHOSEN_LOGPS).to_numpy() - table.column(schema.REF_REJECTED_LOGPS).to_numpy()
        )
    return margins, notes


# --- writing the report ---


def write_report(run_dir: str | Path) -> Report:
    """Write `<run_dir>/report.md` and `<run_dir>/plots/*.png`; returns the path and what each plot shows."""
    run = load_run(run_dir)
    plot_dir = run.dir / PLOTS_DIR
    curves = [
        plots.curve_plot(plot_dir, file, title, ylabel, metrics, run.train, run.evals)
        for file, title, ylabel, metrics in plots.CURVES
    ]
    curves.append(plots.optimizer_plot(plot_dir, run.train))
    histogram = plots.margin_histogram(plot_dir, run.ref_margins) if run.ref_margins else None
    text = "\n".join(
        [
            *_header(run),
            *_summary(run),
            *_metrics_table(run),
            *_curves(curves),
            *_data(run),
            *_reference(run, histogram),
            *_config(run),
        ]
    )
    made = tuple(curves) + ((histogram,) if histogram else ())
    for stale in set(plot_dir.glob("*.png")) - {plot_dir / p.file for p in made}:  # e.g. a cache entry since deleted
        stale.unlink()
    path = run.dir / REPORT
    path.write_text(text)
    return Report(path, made)


def _header(run: RunData) -> list[str]:
    c = run.config
    last = run.train[-1]
    title = f"# DPO run report: {c.get('run_name', run.dir.name)}"
    lines = [title, "", f"`{run.dir}`, written {time.strftime('%Y-%m-%d %H:%M')} by `dpo-pipeline report`.", ""]
    if c:
        weights = c["loss_weights"] or [1.0] * len(c["loss_type"])
        losses = " + ".join(f"{w} × {t}" for t, w in zip(c["loss_type"], weights))
        lines += [
            f"Policy `{c['model']}` trained for {last['step']} optimizer steps with {losses} (β = {c['beta']}); "
            f"reference `{c['ref_model'] or c['model']}`, scored once and cached.",
            "",
        ]
    return lines


def _summary(run: RunData) -> list[str]:
    s = run.summary
    lines = ["## Summary", ""]
    if s is None:
        return [
            *lines,
            f"No {SUMMARY}: the run has not finished (or was stopped), so throughput, memory, the "
            "effective config and the cache entries used are unknown. The curves below show the steps logged "
            "so far.",
            "",
        ]
    gpu = run.config.get("use_gpu", False)
    memory = "maximum CUDA memory allocated" if gpu else "maximum resident set size of the process"
    resumed = f" ({s['steps_this_run']} in the last launch)" if s["steps_this_run"] != s["train_steps"] else ""
    loggers = ["TensorBoard: `tensorboard --logdir " + str(run.dir / "tensorboard") + "`"]
    loggers += [f"{name}: {where}" for name, where in s.get("loggers", {}).items()]
    lines += [
        "| | |",
        "|---|---|",
        f"| optimizer steps | {s['train_steps']}{resumed} |",
        f"| training time | {_duration(s['train_runtime'])} |",
        f"| throughput | {fmt(s['train_samples_per_second'])} pairs/s, {fmt(s['train_tokens_per_second'])} "
        "tokens/s (non-pad) |",
        f"| peak memory, rank 0 | {fmt(s['peak_memory_bytes'] / 1e9)} GB ({memory}) |",
        f"| workers | {s['num_workers']} × DeepSpeed ZeRO-{s['zero_stage']}{', GPU' if gpu else ', CPU'} |",
        "| pairs | "
        + (
            ", ".join(f"{split}: {s['inputs'][split]['pairs']}" for split in _splits(s["inputs"]))
            if s.get("inputs")
            else "not recorded"
        )
        + " |",
        "| loggers | " + "; ".join(loggers) + " |",
        "",
    ]
    return lines


def _metrics_table(run: RunData) -> list[str]:
    first, last = run.train[0], run.train[-1]
    head = ["metric", f"train, first (step {first['step']})", f"train, last (step {last['step']})"]
    columns = [first, last]
    if run.evals:
        head += [f"eval, first (step {run.evals[0]['step']})", f"eval, last (step {run.evals[-1]['step']})"]
        columns += [run.evals[0], run.evals[-1]]
    every = run.config.get("logging_steps")
    lines = [
        "## Metrics",
        "",
        "Train values are means over the optimizer steps of one logging window"
        + (f" ({every} step{'s' if every != 1 else ''})" if every else "")
        + "; eval values are exact over the "
        "whole eval set. Rewards are β · log(π/π_ref) in nats; log-probs are summed over completion tokens.",
        "",
    ]
    if not run.evals:
        lines += [_no_eval(run), ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric in TABLE_METRICS:
        cells = [fmt(c[metric]) if isinstance(c.get(metric), (int, float)) else "–" for c in columns]
        if any(cell != "–" for cell in cells):
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _no_eval(run: RunData) -> str:
    if run.config and not run.config.get("eval_dataset"):
        return "No eval set in this run (`eval_dataset` is empty): there are no eval columns or eval curves."
    return "No eval line in metrics.jsonl yet: there are no eval columns or eval curves."


def _curves(made: list[plots.Plot]) -> list[str]:
    lines = [
        "## Curves",
        "",
        "x axis: optimizer step. Train curves: the logged values (faint) under a smoothed line; "
        "eval curves: dashed, with markers.",
        "",
    ]
    for p in made:
        shown = ", ".join(f"{s.name} ({s.points} points)" for s in p.series) or "nothing logged"
        lines += [
            f"### {p.title}",
            "",
            f"![{p.title}]({PLOTS_DIR}/{p.file})",
            "",
            f"*Series: {shown}.{' ' + p.note[0].upper() + p.note[1:] + '.' if p.note else ''}*",
            "",
        ]
    return lines


def _data(run: RunData) -> list[str]:
    lines = ["## Data", ""]
    if not run.data_reports:
        return [*lines, f"No data report in this run directory ({', '.join(DATA_REPORTS.values())}).", ""]
    for split, r in run.data_reports.items():
        dropped = sum(r["dropped"].values())
        lines += [
            f"### {split}",
            "",
            "| | rows |",
            "|---|---|",
            f"| read | {r['rows_read']} |",
            f"| kept (pairs) | {r['pairs_kept']} |",
        ]
        lines += [f"| dropped: {reason} | {n} |" for reason, n in sorted(r["dropped"].items())]
        lines += [f"| truncated to max_length (kept) | {r['truncated_pairs']} |", ""]
        balance = (
            "every row is accounted for"
            if r["rows_read"] == r["pairs_kept"] + dropped
            else "**rows read ≠ kept + dropped: the data report is inconsistent**"
        )
        lines += [
            f"Format: {r.get('format') or 'unknown'}; {balance} ({r['rows_read']} = {r['pairs_kept']} + {dropped}).",
            "",
        ]
    if "eval" not in run.data_reports:
        lines += ["No eval data report (no eval set).", ""]
    return lines


def _reference(run: RunData, histogram: plots.Plot | None) -> list[str]:
    lines = ["## Reference log-probs (from the cache)", ""]
    entries = (run.summary or {}).get("inputs", {})
    for split, m in run.ref_margins.items():
        lines.append(
            f"- {split}: `{entries[split]['reference']}`: {len(m)} pairs; margin log p_ref(chosen) − log "
            f"p_ref(rejected): mean {fmt(float(np.mean(m)))}, median {fmt(float(np.median(m)))} nats; "
            f"{fmt(100 * float(np.mean(m > 0)))}% of pairs > 0 (the reference already prefers chosen)."
        )
    lines += [f"- {split}: no histogram: {why}." for split, why in run.ref_notes.items()]
    if histogram is not None:
        lines += ["", f"![{histogram.title}]({PLOTS_DIR}/{histogram.file})"]
    return [*lines, ""]


def _config(run: RunData) -> list[str]:
    if not run.config:
        return ["## Effective config", "", f"Not recorded (no {SUMMARY}).", ""]
    order = {key: i for i, key in enumerate(config_fields())}  # by section, as --help lists them
    shown = {
        k: redact_uri(v) if isinstance(v, str) and "://" in v else v
        for k, v in sorted(run.config.items(), key=lambda kv: order.get(kv[0], len(order)))
    }
    return [
        "## Effective config",
        "",
        "Every key, as the run used it (paste into a YAML file to rerun):",
        "",
        "```yaml",
        yaml.safe_dump(shown, sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
    ]


def _splits(per_split: dict[str, Any]) -> list[str]:
    """Split names, train first (train_summary.json stores its keys sorted)."""
    return sorted(per_split, key=lambda split: (split != "train", split))


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{fmt(seconds)} s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return (f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s") + f" ({fmt(seconds)} s)"
