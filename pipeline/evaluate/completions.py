"""The eval prompts' completions, before (reference) and after (policy), as records and as a summary.

    records = completion_records(tokenized, reference, policy, tokenizer_dir)   # one per eval pair
    add_judge_scores(records, judge, spec)                                        # optional
    summary = summarize(records)

A record holds the prompt, chosen and rejected texts, each model's completions (greedy first), the greedy
completions' token counts, and for a builtin question its task family and whether each greedy answer is
right by the task's checker (`pipeline.evaluate.answers`). The summary gives answer accuracy before and after,
overall and per task family (over the prompts a checker knows), the mean greedy length before and after
(DPO's length drift), and the judge's win rate.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pyarrow.parquet as pq

from pipeline import schema
from pipeline.cache import storage
from pipeline.data.entries import TokenizedData
from pipeline.evaluate.answers import is_correct, task_family
from pipeline.evaluate.judge import Judge, judge_score
from pipeline.models.loading import load_tokenizer

Completions = dict[str, list[list[int]]]  # pair_id -> [greedy, *samples] token ids


def completion_records(
    tokenized: TokenizedData, reference: Completions, policy: Completions, tokenizer_dir: str
) -> list[dict[str, Any]]:
    """One record per eval pair, in pair_id order."""
    tokenizer = load_tokenizer(tokenizer_dir)

    def text(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True))

    columns = [schema.PAIR_ID, schema.CHOSEN_INPUT_IDS, schema.REJECTED_INPUT_IDS]
    columns += [schema.CHOSEN_COMPLETION_START, schema.REJECTED_COMPLETION_START]
    fs, files = storage.parquet_source(tokenized.files)
    rows = pq.ParquetDataset(files, filesystem=fs).read(columns=columns).sort_by(schema.PAIR_ID).to_pylist()
    records = []
    for row in rows:
        pid, chosen, start = row[schema.PAIR_ID], row[schema.CHOSEN_INPUT_IDS], row[schema.CHOSEN_COMPLETION_START]
        rejected = row[schema.REJECTED_INPUT_IDS][row[schema.REJECTED_COMPLETION_START] :]
        record: dict[str, Any] = {
            "pair_id": pid,
            "prompt": text(chosen[:start]),
            "chosen": text(chosen[start:]),
            "rejected": text(rejected),
            "reference": [text(c) for c in reference[pid]],
            "policy": [text(c) for c in policy[pid]],
            "reference_tokens": len(reference[pid][0]),
            "policy_tokens": len(policy[pid][0]),
        }
        family = task_family(record["prompt"])
        if family is not None:
            record["task"] = family
            for model in ("reference", "policy"):
                record[f"{model}_correct"] = is_correct(family, record["chosen"], record[model][0])
        records.append(record)
    return records


def add_judge_scores(records: list[dict[str, Any]], judge: Judge, spec: str) -> None:
    """Each record's `judge` score of its greedy completions (1 = the policy's is better)."""
    for i, r in enumerate(records):
        r["judge"] = judge_score(judge, spec, i, r["prompt"], r["reference"][0], r["policy"][0])


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy before/after (overall and per task), mean greedy length before/after, judge win rate."""
    n = len(records)
    checked = [r for r in records if "task" in r]
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in checked:
        by_task[r["task"]].append(r)
    judged = [r["judge"] for r in records if "judge" in r]
    return {
        "prompts": n,
        "mean_tokens": {m: sum(r[f"{m}_tokens"] for r in records) / n if n else 0.0 for m in ("reference", "policy")},
        "answer_accuracy": _accuracy(checked) if checked else None,
        "by_task": {task: _accuracy(rs) for task, rs in sorted(by_task.items())},
        "judge_win_rate": sum(judged) / len(judged) if judged else None,
    }


def _accuracy(records: list[dict[str, Any]]) -> dict[str, float]:
    n = len(records)
    return {
        "prompts": n,
        "reference": sum(r["reference_correct"] for r in records) / n,
        "policy": sum(r["policy_correct"] for r in records) / n,
    }
