"""Stage 4 (generation) on a real local Ray with the tiny random Llama: the batched, left-padded generation
gives each prompt the tokens `model.generate` gives it alone; `run` on builtin questions writes every eval
prompt's completions (reference and exported policy, each equal to `model.generate` here), scores them with the
task checkers and a test judge, caches the reference's completions once, and reports them side by side. Without
Ray: records and summary built from hand-written completions whose correctness is worked out by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from finished_run import RUN_EVAL_PROMPTS, RUN_NEW_TOKENS

from pipeline.config import config_from_dict
from pipeline.data.entries import find_tokenized
from pipeline.evaluate.answers import is_correct, task_family
from pipeline.evaluate.generation import GenerationSettings, generate
from stages.cli import main

NEW = RUN_NEW_TOKENS


def alone(model, prompt: list[int], eos: int, new: int = NEW) -> list[int]:
    """The greedy completion of one unpadded prompt by transformers' own generate, cut before EOS."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=eos)
    ids = out[0, len(prompt) :].tolist()
    return ids[: ids.index(eos)] if eos in ids else ids


def test_batched_greedy_equals_generate_alone(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    texts = ["What is 12 + 34?\nAnswer:", "Hi", "Reverse the letters of 'apple'. Then explain it twice.\nAnswer:"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    assert len({len(p) for p in prompts}) == 3  # different lengths: the batch is left-padded
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    got = generate(model, prompts, pad, eos, GenerationSettings(max_new_tokens=NEW))
    assert [g[0] for g in got] == [alone(model, p, eos) for p in prompts]
    assert all(len(g) == 1 for g in got)

    sampled = GenerationSettings(max_new_tokens=NEW, num_generations=3, temperature=1.5, top_p=0.9)
    first, again = (generate(model, prompts, pad, eos, sampled, seed=7) for _ in range(2))
    assert first == again and all(len(g) == 4 for g in first)  # greedy + 3 samples, reproducible by seed
    assert [g[0] for g in first] == [g[0] for g in got]  # the greedy one is unchanged by sampling
    assert generate(model, prompts, pad, eos, sampled, seed=8) != first
    assert len({tuple(s) for g in first for s in g[1:]}) > 3  # the samples differ


@pytest.fixture(scope="module")
def generated(ray_session, finished_run, tmp_path_factory):
    """The finished run (12 builtin held-out questions, stage 4 with the `shorter_wins` judge) and a copy of its
    output_dir for the commands below, which write into it (in this session's Ray)."""
    assert finished_run.returncode == 0, finished_run.stderr[-3000:]
    copy = tmp_path_factory.mktemp("gen") / "run"
    shutil.copytree(finished_run.out, copy)
    return finished_run, copy


def test_run_generates_scores_and_reports(generated, capfd, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    finished, copy = generated
    cfg, run = finished.cfg, finished.out
    records = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    summary = json.loads((run / "generation_summary.json").read_text())
    assert len(records) == summary["prompts"] == RUN_EVAL_PROMPTS

    # every completion is transformers' generate on that prompt alone: reference = the tiny model, policy = final/
    tok = AutoTokenizer.from_pretrained(cfg["model"])
    eos = tok.eos_token_id
    before = AutoModelForCausalLM.from_pretrained(cfg["model"]).eval()
    after = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    tokenized = find_tokenized(config_from_dict(cfg), tuple(cfg["eval_dataset"]))
    rows = pq.ParquetDataset(tokenized.files).read().sort_by("pair_id").to_pylist()
    moved = 0
    for row, record in zip(rows, records, strict=True):
        prompt = row["chosen_input_ids"][: row["chosen_completion_start"]]
        ref, pol = alone(before, prompt, eos), alone(after, prompt, eos)
        assert record["pair_id"] == row["pair_id"]
        assert record["reference"] == [tok.decode(ref, skip_special_tokens=True)]
        assert record["policy"] == [tok.decode(pol, skip_special_tokens=True)]
        assert (record["reference_tokens"], record["policy_tokens"]) == (len(ref), len(pol))
        moved += ref != pol
        family = task_family(record["prompt"])  # builtin questions: every prompt has a checker
        assert family is not None and record["task"] == family
        assert record["policy_correct"] == is_correct(family, record["chosen"], record["policy"][0])
        p, r = len(record["policy"][0]), len(record["reference"][0])
        assert record["judge"] == (0.5 if p == r else float(p < r))
    assert moved > 0  # training changed some answers, so before and after are told apart

    n = RUN_EVAL_PROMPTS
    acc = summary["answer_accuracy"]
    assert acc["prompts"] == n
    assert acc["reference"] == sum(r["reference_correct"] for r in records) / n
    assert acc["policy"] == sum(r["policy_correct"] for r in records) / n
    assert sum(t["prompts"] for t in summary["by_task"].values()) == n
    assert summary["judge_win_rate"] == pytest.approx(sum(r["judge"] for r in records) / n)
    assert summary["mean_tokens"]["policy"] == pytest.approx(sum(r["policy_tokens"] for r in records) / n)
    assert f"held-out answer accuracy: {acc['reference']:.3f} -> {acc['policy']:.3f}" in finished.stdout

    report = (run / "report.md").read_text()
    assert "## Answers before and after" in report and "| prompt | chosen | rejected |" in report
    side_by_side = report.split("side by side:")[1].split("\n\n")[1].splitlines()
    assert len(side_by_side) == 2 + 4  # header, rule, report_samples rows
    assert f"policy's answer wins {100 * summary['judge_win_rate']:.1f}%" in report

    # a second `generate` reuses the reference's cached completions and gives the same summary
    monkeypatch.chdir(finished.root)  # the judge module is importable from the working directory
    assert main(["generate", "--config", str(finished.config), "--output_dir", str(copy)]) == 0
    assert "reusing cached reference completions" in capfd.readouterr().out
    assert len(list(Path(cfg["cache_dir"], "generations").iterdir())) == 1
    assert json.loads((copy / "generation_summary.json").read_text()) == summary


def test_judge_errors_are_clear(generated, capfd, monkeypatch):
    finished, copy = generated
    monkeypatch.chdir(finished.root)
    args = ["generate", "--config", str(finished.config), "--output_dir", str(copy)]
    assert main([*args, "--judge", "judges:broken"]) == 2
    err = capfd.readouterr().err
    assert "error: judge judges:broken on eval prompt 0" in err and "returned 2.0: expected a number in [0, 1]" in err
    assert main([*args, "--judge", "no_such_module:f"]) == 2
    assert "error: judge='no_such_module:f': cannot import no_such_module" in capfd.readouterr().err


def test_generate_before_training_says_what_to_run(tmp_path, tiny_model_dir, capfd):
    args = ["generate", "--model", str(tiny_model_dir), "--eval_dataset", "builtin:demo-test-text:4"]
    assert main([*args, "--output_dir", str(tmp_path / "none"), "--cache_dir", str(tmp_path / "c")]) == 2
    assert "run `dpo-pipeline train` (or `run`) first" in capfd.readouterr().err
    assert main(["generate", "--model", str(tiny_model_dir), "--output_dir", str(tmp_path)]) == 2
    assert "generate answers the eval prompts: set eval_dataset" in capfd.readouterr().err
    assert main([*args, "--output_dir", str(tmp_path), "--max_new_tokens", "0"]) == 2
    assert "max_new_tokens is 0: nothing to generate" in capfd.readouterr().err


def test_reference_free_before_is_the_starting_policy(tiny_model_dir):
    from stages.stage4_generate import before_model

    base = {"model": str(tiny_model_dir), "ref_model": "/elsewhere/ref"}
    assert before_model(config_from_dict({**base, "loss_type": ["simpo"]})) == str(tiny_model_dir)
    assert before_model(config_from_dict(base)) == "/elsewhere/ref"


def test_report_cells_are_one_escaped_line():
    from pipeline.report.generation_report import _cell

    assert _cell("a | b\nc") == "a \\| b c"
    assert _cell("x" * 500).endswith("…") and len(_cell("x" * 500)) == 160


def test_an_object_store_output_dir_is_said_not_silently_skipped():
    from stages.stage4_generate import unsupported

    assert unsupported(config_from_dict({"output_dir": "runs/x"})) is None
    why = unsupported(config_from_dict({"output_dir": "s3://bucket/runs/x"}))
    assert why is not None and "needs a local or shared output_dir" in why  # `run` prints it as "stage 4 skipped"


# Stage 4's records from the outside: hand-written eval pairs and completions whose correctness is known, each
# record's expected task and correctness written by hand (not by the checker the code uses).
# pair_id: (prompt, chosen, rejected, reference [greedy, sample], policy [greedy, sample])
PAIRS = {
    "a1": ("What is 12 + 44?\nAnswer:", " 56", " 57", [" 57", " 56"], [" 56", " 57"]),  # wrong -> right
    "b2": ("What is 30 + 25?\nAnswer:", " 55", " 65", [" 55", " 65"], [" 55 or 56", " 55"]),  # right -> hedged
    "c3": ("Reverse the letters of 'river'.\nAnswer:", " revir", " river", ["", " revir"], [" Revir.", ""]),
    "d4": ("Which is larger, 123 or 456?\nAnswer:", " 456", " 123", [" 456", " 123"], [" 456 is larger.", " 1"]),
    "e5": ("Say hello.\nAnswer:", " Hello", " Go away", [" Hi", " Hello"], [" Hello", " Hi"]),  # no checker
}
# pair_id: (task, reference_correct, policy_correct), None for a prompt no checker knows
KNOWN = {
    "a1": ("addition", False, True),
    "b2": ("addition", True, False),
    "c3": ("reverse", False, True),  # the reference's greedy answer is empty
    "d4": ("compare", True, True),
    "e5": None,
}


def test_records_and_summary_of_hand_written_completions(tokenizer, tokenizer_dir, tmp_path):
    from pipeline.data.entries import TokenizedData
    from pipeline.evaluate.completions import completion_records, summarize

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rows = []
    for pid, (prompt, chosen, rejected, _, _) in reversed(PAIRS.items()):  # written out of pair_id order
        rows.append(
            {
                "pair_id": pid,
                "chosen_input_ids": ids(prompt) + ids(chosen),
                "rejected_input_ids": ids(prompt) + ids(rejected),
                "chosen_completion_start": len(ids(prompt)),
                "rejected_completion_start": len(ids(prompt)),
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    tokenized = TokenizedData(tmp_path, "hand", {"files": {"pairs.parquet": {}}})
    reference = {pid: [ids(c) for c in p[3]] for pid, p in PAIRS.items()}
    policy = {pid: [ids(c) for c in p[4]] for pid, p in PAIRS.items()}

    records = completion_records(tokenized, reference, policy, str(tokenizer_dir))
    assert [r["pair_id"] for r in records] == list(PAIRS)
    for r in records:
        texts = PAIRS[r["pair_id"]]
        assert [r[k] for k in ("prompt", "chosen", "rejected", "reference", "policy")] == list(texts)
        assert (r["reference_tokens"], r["policy_tokens"]) == (len(ids(texts[3][0])), len(ids(texts[4][0])))
        known = KNOWN[r["pair_id"]]
        got = (r["task"], r["reference_correct"], r["policy_correct"]) if "task" in r else None
        assert got == known, r["pair_id"]
        assert known is not None or not {"reference_correct", "policy_correct"} & set(r)

    summary = summarize(records)
    # before: a1 ✗ b2 ✓ c3 ✗ d4 ✓ = 2/4; after: a1 ✓ b2 ✗ c3 ✓ d4 ✓ = 3/4 (e5 has no checker)
    assert summary["prompts"] == 5
    assert summary["answer_accuracy"] == {"prompts": 4, "reference": 0.5, "policy": 0.75}
    assert summary["by_task"] == {
        "addition": {"prompts": 2, "reference": 0.5, "policy": 0.5},
        "compare": {"prompts": 1, "reference": 1.0, "policy": 1.0},
        "reverse": {"prompts": 1, "reference": 0.0, "policy": 1.0},
    }
    assert summary["judge_win_rate"] is None


def test_summary_of_hand_written_records():
    from pipeline.evaluate.completions import summarize

    def record(tokens: tuple[int, int], task: str | None = None, correct: tuple[bool, bool] = (False, False)):
        r = {"reference_tokens": tokens[0], "policy_tokens": tokens[1]}
        return r if task is None else {**r, "task": task, "reference_correct": correct[0], "policy_correct": correct[1]}

    records = [
        record((4, 2), "sequence", (True, False)),
        record((6, 9), "sequence", (True, True)),
        record((3, 3), "rounding", (False, True)),
        record((7, 2)),
    ]
    records[0]["judge"], records[3]["judge"] = 1.0, 0.25
    assert summarize(records) == {
        "prompts": 4,
        "mean_tokens": {"reference": 20 / 4, "policy": 16 / 4},
        "answer_accuracy": {"prompts": 3, "reference": 2 / 3, "policy": 2 / 3},
        "by_task": {
            "rounding": {"prompts": 1, "reference": 0.0, "policy": 1.0},
            "sequence": {"prompts": 2, "reference": 1.0, "policy": 0.5},
        },
        "judge_win_rate": 1.25 / 2,
    }
    assert summarize([record((1, 2))])["answer_accuracy"] is None
    assert summarize([record((1, 2))])["by_task"] == {}
