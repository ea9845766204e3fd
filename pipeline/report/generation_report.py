"""The report's "Answers before and after" section, from stage 4's generation_summary.json and generations.jsonl:
answer accuracy per task family, greedy length before and after, the judge's win rate, and eval prompts side by
side (chosen, rejected, the reference's answer, the policy's answer)."""

from __future__ import annotations

from typing import Any

from pipeline.rundir import GENERATION_SUMMARY, GENERATIONS_FILE, RunData

DEFAULT_SAMPLES = 8
CELL_CHARS = 160  # a table cell longer than this is cut (the full text is in generations.jsonl)


def generation_section(run: RunData) -> list[str]:
    lines = ["## Answers before and after", ""]
    s = run.generation_summary
    if s is None:
        return [
            *lines,
            f"No {GENERATION_SUMMARY}: no completions were generated (`dpo-pipeline generate` writes them; `run` "
            "does when eval_dataset is set).",
            "",
        ]
    ref, pol = s["mean_tokens"]["reference"], s["mean_tokens"]["policy"]
    lines += [
        f"The {s['prompts']} eval prompts answered greedily by the reference (before) and the trained policy "
        f"(after); every completion is in `{GENERATIONS_FILE}`.",
        "",
        f"- Greedy completion length: {ref:.2f} → {pol:.2f} tokens on average ({_change(ref, pol)}).",
    ]
    if s["judge_win_rate"] is not None:
        judge = run.config.get("judge", "the judge")
        lines.append(f"- Judge `{judge}`: the policy's answer wins {100 * s['judge_win_rate']:.1f}% (ties count half).")
    acc = s["answer_accuracy"]
    if acc is None:
        lines += ["- Answer accuracy: none of the eval prompts is a builtin question with a checker.", ""]
    else:
        lines += [
            f"- Answer accuracy (task checkers, {acc['prompts']} of {s['prompts']} prompts): "
            f"{acc['reference']:.3f} → {acc['policy']:.3f}.",
            "",
            "| task | prompts | before | after |",
            "|---|---:|---:|---:|",
            *(
                f"| {task} | {a['prompts']} | {a['reference']:.3f} | {a['policy']:.3f} |"
                for task, a in s["by_task"].items()
            ),
            "",
        ]
    samples = run.generations[: _samples(run)]
    if samples:
        lines += [
            f"The first {len(samples)} eval prompts side by side:",
            "",
            "| prompt | chosen | rejected | before (reference) | after (policy) |",
            "|---|---|---|---|---|",
            *(
                "| "
                + " | ".join(_cell(r[k] if isinstance(r[k], str) else r[k][0]) + _mark(r, k) for k in _COLUMNS)
                + " |"
                for r in samples
            ),
            "",
        ]
    return lines


_COLUMNS = ("prompt", "chosen", "rejected", "reference", "policy")


def _samples(run: RunData) -> int:
    cfg = run.cfg
    return cfg.generate.report_samples if cfg is not None else DEFAULT_SAMPLES


def _mark(record: dict[str, Any], column: str) -> str:
    """✓ or ✗ after a greedy answer that a task checker scored."""
    verdict = record.get(f"{column}_correct")
    return "" if verdict is None else (" ✓" if verdict else " ✗")


def _cell(text: str) -> str:
    """Markdown-table-safe: one line, pipes escaped, cut to CELL_CHARS."""
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= CELL_CHARS else flat[: CELL_CHARS - 1] + "…"


def _change(before: float, after: float) -> str:
    return "no change" if before == after or before == 0 else f"{100 * (after - before) / before:+.1f}%"
