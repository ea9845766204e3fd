"""`dpo-pipeline report RUN_DIR`: report.md and PNG plots for a training run's output directory.

    dpo-pipeline report runs/demo     # writes runs/demo/report.md and runs/demo/plots/*.png

Everything comes from the run directory: metrics.jsonl, train_summary.json (throughput, memory, the effective
config and the cache entries used), data_report.json and eval_data_report.json; the margin histogram reads
the reference-cache entry that train_summary.json names. Only metrics.jsonl is required: anything else that
is missing (no eval set, a run that has not finished, a deleted cache entry) is stated in the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import yaml

from pipeline.cache.storage import LocalMirror, Location
from pipeline.config import config_fields
from pipeline.report import plots
from pipeline.report.generation_report import generation_section
from pipeline.rundir import DATA_REPORTS, PLOTS, REPORT, SUMMARY, TENSORBOARD, RunData, load_run, splits
from pipeline.uris import redact_uri

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
class Report:
    path: Location
    plots: tuple[plots.Plot, ...]


# --- writing the report ---


def write_report(run_dir: str) -> Report:
    """Write `<run_dir>/report.md` and `<run_dir>/plots/*.png`; returns the path and what each plot shows.
    For a URI run directory the files are made in a local folder and uploaded."""
    run = load_run(run_dir)
    out = LocalMirror(str(run.dir))
    plot_dir = out.local / PLOTS
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
            *generation_section(run),
            *_config(run),
        ]
    )
    made = tuple(curves) + ((histogram,) if histogram else ())
    for stale in set(plot_dir.glob("*.png")) - {plot_dir / p.file for p in made}:  # e.g. a cache entry since deleted
        stale.unlink()
    (out.local / REPORT).write_text(text)
    out.push()
    out.close()
    return Report(run.dir / REPORT, made)


def _header(run: RunData) -> list[str]:
    c = run.config
    last = run.train[-1]
    title = f"# DPO run report: {c.get('run_name', run.dir.name)}"
    lines = [title, "", f"`{run.dir}`, written {time.strftime('%Y-%m-%d %H:%M')} by `dpo-pipeline report`.", ""]
    cfg = run.cfg
    if cfg is not None:
        losses = " + ".join(f"{w} × {t}" for t, w in zip(cfg.loss.loss_type, cfg.loss.weights))
        reference = (
            f"reference `{cfg.ref_model_name}`, scored once and cached"
            if cfg.loss.needs_reference
            else "no reference model (reference-free losses)"
        )
        lines += [
            f"Policy `{cfg.model.model}` trained for {last['step']} optimizer steps with {losses} (β = "
            f"{cfg.loss.beta}); {reference}.",
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
    loggers = ["TensorBoard: `tensorboard --logdir " + str(run.dir / TENSORBOARD) + "`"]
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
            ", ".join(f"{split}: {s['inputs'][split]['pairs']}" for split in splits(s["inputs"]))
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
            f"![{p.title}]({PLOTS}/{p.file})",
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
        lines += ["", f"![{histogram.title}]({PLOTS}/{histogram.file})"]
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


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{fmt(seconds)} s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return (f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s") + f" ({fmt(seconds)} s)"
