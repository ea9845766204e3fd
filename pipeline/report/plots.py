"""PNG plots of a run, drawn on matplotlib's Agg canvas (no display, no pyplot global state).

Train curves are drawn raw and faint under a smoothed line (a debiased exponential moving average, like
TensorBoard's smoothing); eval curves, exact over the whole eval set, are drawn as they are. The x axis is
the optimizer step. Each function returns a `Plot` naming the series it drew, read back from the figure, so
that a caller (or a test) can check what a PNG shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

DPI = 120
SIZE = (8.0, 4.5)  # inches: 960 x 540 pixels
COLOURS = {
    "rewards/chosen": "tab:green",
    "logps/chosen": "tab:green",
    "rewards/rejected": "tab:red",
    "logps/rejected": "tab:red",
}
TRAIN_COLOUR, EVAL_COLOUR = "tab:blue", "tab:orange"

# file, title, y label, metrics: one figure each, train and eval in the same axes
CURVES = (
    ("loss.png", "DPO loss", "loss (nats)", ("loss",)),
    ("rewards_margins.png", "Reward margin: chosen − rejected", "β · log-ratio margin (nats)", ("rewards/margins",)),
    (
        "rewards_accuracies.png",
        "Reward accuracy: pairs whose chosen reward beats the rejected one",
        "fraction of pairs",
        ("rewards/accuracies",),
    ),
    (
        "rewards.png",
        "Implicit rewards of the chosen and rejected completions",
        "β · log-ratio (nats)",
        ("rewards/chosen", "rewards/rejected"),
    ),
    (
        "logps.png",
        "Policy log-probabilities of the completions",
        "log-prob of a completion (nats)",
        ("logps/chosen", "logps/rejected"),
    ),
)


@dataclass(frozen=True)
class Series:
    name: str
    points: int  # points of a line; for a histogram, the number of values counted


@dataclass(frozen=True)
class Plot:
    file: str
    title: str
    series: tuple[Series, ...]
    note: str = ""  # how the figure was made (smoothing), for the report's caption


def ema(values: np.ndarray, span: int) -> np.ndarray:
    """Debiased exponential moving average, alpha = 2 / (span + 1): it starts at the first value, not at 0."""
    alpha = 2.0 / (span + 1)
    out = np.empty(len(values), dtype=np.float64)
    acc = weight = 0.0
    for i, v in enumerate(values):
        acc = (1 - alpha) * acc + alpha * float(v)
        weight = (1 - alpha) * weight + alpha
        out[i] = acc / weight
    return out


def smoothing_span(points: int) -> int:
    """About a tenth of the points, and at least 2, so that the smoothed line differs from the raw one."""
    return max(2, round(points / 10))


def points(records: Sequence[dict[str, Any]], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `metric`, finite values only."""
    pairs = [
        (r["step"], r[metric]) for r in records if isinstance(r.get(metric), (int, float)) and np.isfinite(r[metric])
    ]
    steps = np.array([s for s, _ in pairs], dtype=np.float64)
    return steps, np.array([v for _, v in pairs], dtype=np.float64)


def curve_plot(
    out_dir: Path,
    file: str,
    title: str,
    ylabel: str,
    metrics: Sequence[str],
    train: Sequence[dict[str, Any]],
    evals: Sequence[dict[str, Any]],
) -> Plot:
    """One figure: each metric's train curve (raw + EMA) and eval curve over optimizer steps."""
    fig, ax = _figure()
    spans = [_draw_train(ax, train, m) for m in metrics]
    for m in metrics:
        xs, ys = points(evals, m)
        if len(xs):
            ax.plot(xs, ys, color=COLOURS.get(m, EVAL_COLOUR), ls="--", marker="o", ms=4, lw=1.5, label=f"eval {m}")
    if "rewards/accuracies" in metrics:
        ax.set_ylim(-0.03, 1.03)
    _finish(ax, title, ylabel)
    return _save(fig, out_dir, file, title, _smoothing_note(spans))


def optimizer_plot(out_dir: Path, train: Sequence[dict[str, Any]]) -> Plot:
    """Learning rate (as scheduled, raw) above the gradient norm (raw + EMA), on a shared step axis."""
    title = "Learning rate and gradient norm"
    fig = Figure(figsize=(SIZE[0], SIZE[1] * 1.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    xs, ys = points(train, "learning_rate")
    top.plot(xs, ys, color=TRAIN_COLOUR, lw=1.5, marker="." if len(xs) <= 50 else None, label="learning_rate")
    top.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    _finish(top, title, "learning rate", xlabel=False)
    span = _draw_train(bottom, train, "grad_norm")
    _finish(bottom, "", "gradient norm (L2, all parameters)")
    return _save(fig, out_dir, "optimizer.png", title, _smoothing_note([span]))


def margin_histogram(out_dir: Path, margins: dict[str, np.ndarray]) -> Plot:
    """Histogram of the cached reference margins log p_ref(chosen) − log p_ref(rejected), one colour per split."""
    title = "Reference log-prob margins (chosen − rejected)"
    fig, ax = _figure()
    finite = {split: m[np.isfinite(m)] for split, m in margins.items()}
    everything = np.concatenate([m for m in finite.values()] or [np.zeros(0)])
    bins = (
        np.histogram_bin_edges(everything, bins=min(60, max(10, int(np.sqrt(len(everything))))))
        if len(everything)
        else 10
    )
    for split, values in finite.items():
        ax.hist(
            values,
            bins=bins,
            alpha=0.5,
            color=TRAIN_COLOUR if split == "train" else EVAL_COLOUR,
            label=f"{split} ({len(values)} pairs)",
        )
    ax.axvline(0.0, color="grey", ls=":", lw=1, label="_zero")
    _finish(ax, title, "pairs", xlabel=False)
    ax.set_xlabel("log p_ref(chosen) − log p_ref(rejected)  (nats; > 0: the reference already prefers chosen)")
    return _save(fig, out_dir, "ref_margins.png", title)


# --- helpers ---


def _figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=SIZE, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _draw_train(ax: Any, train: Sequence[dict[str, Any]], metric: str) -> int:
    """The raw curve, faint, and its EMA on top; returns the EMA span (0 when there is nothing to draw)."""
    xs, ys = points(train, metric)
    if not len(xs):
        return 0
    colour = COLOURS.get(metric, TRAIN_COLOUR)
    span = smoothing_span(len(ys))
    ax.plot(
        xs, ys, color=colour, alpha=0.35, lw=1, marker="." if len(xs) <= 50 else None, label=f"train {metric} (raw)"
    )
    ax.plot(xs, ema(ys, span), color=colour, lw=2, label=f"train {metric} (EMA)")
    return span


def _finish(ax: Any, title: str, ylabel: str, xlabel: bool = True) -> None:
    if title:
        ax.set_title(title)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel("optimizer step")
    ax.grid(True, alpha=0.3)
    if any(not h.get_label().startswith("_") for h in ax.get_legend_handles_labels()[0]):
        ax.legend(fontsize="small")
    elif not ax.get_lines():  # say so, rather than leave an empty frame
        ax.text(
            0.5,
            0.5,
            "not logged (absent or NaN in metrics.jsonl)",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="grey",
        )


def _smoothing_note(spans: Sequence[int]) -> str:
    used = sorted({s for s in spans if s})
    return f"smoothed: EMA with span {', '.join(map(str, used))} logged points" if used else ""


def _series(fig: Figure) -> tuple[Series, ...]:
    """What the figure shows, read back from its artists: labelled lines and histograms."""
    out = []
    for ax in fig.axes:
        out += [
            Series(str(line.get_label()), len(np.asarray(line.get_xdata())))
            for line in ax.get_lines()
            if not str(line.get_label()).startswith("_")
        ]
        for bars in ax.containers:
            if not isinstance(bars, BarContainer):
                continue
            label = str(bars.patches[0].get_label() if bars.patches else bars.get_label())
            if not label.startswith("_"):
                out.append(Series(label, round(sum(p.get_height() for p in bars.patches))))
    return tuple(out)


def _save(fig: Figure, out_dir: Path, file: str, title: str, note: str = "") -> Plot:
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / file, dpi=DPI)
    return Plot(file=file, title=title, series=_series(fig), note=note)
