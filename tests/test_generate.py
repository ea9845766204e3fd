"""Stage 4 (generation) on a real local Ray with the tiny random Llama: the batched, left-padded generation
gives each prompt the tokens `model.generate` gives it alone; `run` on builtin questions writes every eval
prompt's completions (reference and exported policy, each equal to `model.generate` here), scores them with the
task checkers and a test judge, caches the reference's completions once, and reports them side by side."""

from __future__ import annotations

import json
import textwrap

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import config_from_dict
from pipeline.data.entries import find_tokenized
from pipeline.evaluate.answers import is_correct, task_family
from pipeline.evaluate.generation import GenerationSettings, generate
from stages.cli import main

NEW = 6  # max_new_tokens


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


JUDGE = '''
def shorter_wins(prompt: str, reference: str, policy: str) -> float:
    """1 when the policy's answer is shorter, 0 when longer, 0.5 on a tie."""
    return 0.5 if len(policy) == len(reference) else float(len(policy) < len(reference))


def broken(prompt: str, reference: str, policy: str) -> float:
    return 2.0
'''


@pytest.fixture(scope="module")
def generated(ray_session, tiny_model_dir, tmp_path_factory):
    """`run` on 32 builtin training questions and 12 held-out ones, 2 steps, then `generate` again."""
    root = tmp_path_factory.mktemp("gen")
    (root / "judges.py").write_text(textwrap.dedent(JUDGE))
    cfg = {
        "model": str(tiny_model_dir),
        "cache_dir": str(root / "cache"),
        "output_dir": str(root / "run"),
        "run_name": "gen",
        "dataset": ["builtin:demo-train-text:32"],
        "eval_dataset": ["builtin:demo-test-text:12"],
        "max_steps": 2,
        "learning_rate": 1e-3,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 5,  # 3 generation batches of 5, 5 and 2 prompts
        "zero_stage": 0,
        "gradient_checkpointing": False,
        "max_new_tokens": NEW,
        "report_samples": 4,
        "judge": "judges:shorter_wins",
    }
    path = root / "gen.yaml"
    path.write_text(json.dumps(cfg))
    return root, path, cfg


def test_run_generates_scores_and_reports(generated, tiny_model_dir, capfd, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, path, cfg = generated
    monkeypatch.chdir(root)  # the judge module is importable from the working directory
    assert main(["run", "--config", str(path)]) == 0
    console = capfd.readouterr().out
    run = root / "run"
    records = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    summary = json.loads((run / "generation_summary.json").read_text())
    assert len(records) == summary["prompts"] == 12

    # every completion is transformers' generate on that prompt alone: reference = the tiny model, policy = final/
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tok.eos_token_id
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
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

    acc = summary["answer_accuracy"]
    assert acc["prompts"] == 12
    assert acc["reference"] == sum(r["reference_correct"] for r in records) / 12
    assert acc["policy"] == sum(r["policy_correct"] for r in records) / 12
    assert sum(t["prompts"] for t in summary["by_task"].values()) == 12
    assert summary["judge_win_rate"] == pytest.approx(sum(r["judge"] for r in records) / 12)
    assert summary["mean_tokens"]["policy"] == pytest.approx(sum(r["policy_tokens"] for r in records) / 12)
    assert f"held-out answer accuracy: {acc['reference']:.3f} -> {acc['policy']:.3f}" in console

    report = (run / "report.md").read_text()
    assert "## Answers before and after" in report and "| prompt | chosen | rejected |" in report
    side_by_side = report.split("side by side:")[1].split("\n\n")[1].splitlines()
    assert len(side_by_side) == 2 + 4  # header, rule, report_samples rows
    assert f"policy's answer wins {100 * summary['judge_win_rate']:.1f}%" in report

    # a second `generate` reuses the reference's cached completions and gives the same summary
    assert main(["generate", "--config", str(path)]) == 0
    assert "reusing cached reference completions" in capfd.readouterr().out
    assert len(list((root / "cache" / "generations").iterdir())) == 1
    assert json.loads((run / "generation_summary.json").read_text()) == summary


def test_judge_errors_are_clear(generated, capfd, monkeypatch):
    root, path, _ = generated
    monkeypatch.chdir(root)
    assert main(["generate", "--config", str(path), "--judge", "judges:broken"]) == 2
    err = capfd.readouterr().err
    assert "error: judge judges:broken on eval prompt 0" in err and "returned 2.0: expected a number in [0, 1]" in err
    assert main(["generate", "--config", str(path), "--judge", "no_such_module:f"]) == 2
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
