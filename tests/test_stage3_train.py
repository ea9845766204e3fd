"""Stage 3 on a real local Ray with real DeepSpeed on CPU and a tiny random Llama.

Invariants (DESIGN.md): the policy starts as the reference, so step-1 sigmoid loss is ln 2 and rewards
are 0 for any worker count or ZeRO stage; the data schedule makes 2 workers x 4 pairs, and 4 x 2
accumulated, follow the same trajectory as 1 worker x 8; resuming reproduces the uninterrupted run.
Tolerances: 1e-5 on ln 2; 2e-4 between runs that differ only in reduction order (fp32 all-reduce and
ZeRO partitioning change summation order over 6 steps of training at lr 1e-3).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from colour_pairs import EVAL_PAIRS, tokenize_and_score

from pipeline.config import config_from_dict
from pipeline.errors import CacheError, ConfigError
from pipeline.train.faults import FAULT_ENV
from stages.stage3_train import run_train

LN2 = math.log(2.0)
STEPS = 4


@pytest.fixture(scope="module")
def prepared(colour_pairs, tiny_model_dir, tmp_path_factory):
    """Tokenized and reference-scored train (32 pairs) and eval (6 pairs) data in this module's copy of the cache."""
    root = tmp_path_factory.mktemp("train")
    shutil.copytree(colour_pairs.cache, root / "cache")
    base = {
        "model": str(tiny_model_dir),
        "cache_dir": str(root / "cache"),
        "dataset": [str(colour_pairs.train)],
        "eval_dataset": [str(colour_pairs.eval)],
        "max_steps": STEPS,
        "learning_rate": 1e-3,
        "per_device_train_batch_size": 8,
        "logging_steps": 1,
        "save_steps": 2,
        "zero_stage": 0,
        "gradient_checkpointing": False,
        "lr_scheduler_type": "linear",
        "warmup_steps": 1,
        "max_grad_norm": 1.0,
    }
    return root, base


def train(prepared, name: str, **overrides):
    root, base = prepared
    cfg = config_from_dict({**base, "output_dir": str(root / name), "run_name": name, **overrides})
    summary = run_train(cfg)
    lines = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
    return cfg, summary, lines


def losses(lines):
    return [x["loss"] for x in lines if "loss" in x]


def first_train(lines):
    return next(x for x in lines if "loss" in x)


def assert_reference_start(lines):
    first = first_train(lines)
    assert first["step"] == 1
    assert abs(first["loss"] - LN2) < 1e-5
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    step0 = next(x for x in lines if "eval_loss" in x)
    assert step0["step"] == 0 and abs(step0["eval_loss"] - LN2) < 1e-5 and step0["eval_rewards/accuracies"] == 0.0


@pytest.fixture(scope="module")
def baseline(prepared):
    return train(prepared, "baseline")


def test_one_worker_zero0_outputs(baseline, prepared, tiny_model_dir):
    cfg, summary, lines = baseline
    assert_reference_start(lines)
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == [1, 2, 3, 4]
    assert len({x["step"] for x in lines if "eval_loss" in x}) == len([x for x in lines if "eval_loss" in x])
    # warm-up: step 1 runs at lr 0, so step 2 still sees the reference; from step 3 the policy has moved
    assert losses(lines)[1] == pytest.approx(LN2, abs=1e-5) and abs(losses(lines)[2] - LN2) > 1e-3
    for key in (
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "entropy",
        "mean_token_accuracy",
        "num_tokens",
        "grad_norm",
        "learning_rate",
        "epoch",
    ):
        assert key in lines[-2] or key in lines[-1]
    # linear schedule, 1 warm-up step, 4 steps: the rate after step s is lr * lambda(s)
    lrs = [x["learning_rate"] for x in lines if "loss" in x]
    assert lrs == pytest.approx([1e-3 * v for v in (1.0, 2 / 3, 1 / 3, 0.0)], abs=1e-9)
    assert summary["train_steps"] == STEPS and summary["train_samples_per_second"] > 0
    assert summary["peak_memory_bytes"] > 0
    assert (Path(cfg.data.output_dir) / "tensorboard").is_dir()

    # export: final/ reloads like any HF model and gives the engine's log-probs (final eval logps/chosen)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(cfg.data.output_dir) / "final").eval()
    tok_dir = Path(cfg.data.output_dir) / "final"
    assert (tok_dir / "tokenizer.json").is_file() and (tok_dir / "model.safetensors").is_file()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    total = 0.0
    for text, chosen, _ in EVAL_PAIRS:
        prompt = tok(text)["input_ids"]
        ids = tok(f"{text}{chosen}{tok.eos_token}")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        total += sum(logp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))
    final_eval = summary["final_eval"]
    assert total / 6 == pytest.approx(final_eval["logps/chosen"], abs=1e-4)


# Runs that several tests read, trained once on first use (`shared_run`): 2 workers x 4 pairs at ZeRO-2 on
# right-padded rows, evaluated in batches of 2 (3 batches: rank 1 runs a filler in round 2); the same at ZeRO-3,
# padding-free; and token-budget micro-batches of <= 60 tokens on 2 workers x 2 accumulated for one epoch,
# evaluated in budget batches of uneven size.
SHARED_RUNS = {
    "w2z2": {"num_workers": 2, "per_device_train_batch_size": 4, "zero_stage": 2, "padding_free": False,
             "per_device_eval_batch_size": 2},
    "w2z3": {"num_workers": 2, "per_device_train_batch_size": 4, "zero_stage": 3, "padding_free": True},
    "budget": {"max_tokens_per_batch": 60, "num_workers": 2, "zero_stage": 2, "gradient_accumulation_steps": 2,
               "max_steps": -1, "num_train_epochs": 1.0, "per_device_eval_batch_size": 4},
}  # fmt: skip


@pytest.fixture(scope="module")
def shared_run(prepared):
    runs: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in runs:
            runs[name] = train(prepared, name, **SHARED_RUNS[name])
        return runs[name]

    return get


@pytest.mark.parametrize("name", ["w2z2", "w2z3"])
def test_two_workers_match_one_worker(prepared, baseline, shared_run, name):
    """The baseline runs padding-free (the default); the ZeRO-2 run uses right-padded rows with SDPA masks,
    so it also shows the two layouts follow the same trajectory. ZeRO-3 builds the policy partitioned and
    exports it one gathered tensor at a time: the same final weights."""
    _, _, lines = shared_run(name)
    assert_reference_start(lines)
    assert_same_trajectory(lines, baseline, prepared, name)


@pytest.mark.parametrize("name", ["sp2z0", "sp2z3-lora"])
def test_sequences_split_over_two_workers_match_one_worker(prepared, baseline, lora_baseline, name):
    """sequence_parallel_size 2 on 2 workers: one group, so the global batch is the 1-worker run's 8 pairs, each of
    its sequences split in two halves: full training on packed rows at ZeRO-0 against the baseline; LoRA on
    right-padded rows, recomputed in backward, at ZeRO-3 against the LoRA baseline. Every step's loss, margin,
    log-probs and gradient norm, and every eval, equal the one-worker run's to 1e-5."""
    lora = name.endswith("lora")
    overrides = {"zero_stage": 3, "padding_free": False, "gradient_checkpointing": True, **LORA} if lora else {}
    reference = lora_baseline if lora else baseline
    _, summary, lines = train(prepared, name, num_workers=2, sequence_parallel_size=2, **overrides)
    assert_reference_start(lines)
    ours, theirs = ([x for x in run if "loss" in x] for run in (lines, reference[2]))
    assert len(ours) == len(theirs) == STEPS
    for a, b in zip(ours, theirs, strict=True):
        for key in ("loss", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected", "entropy"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5, abs=1e-6), a["step"]
        assert a["num_tokens"] == b["num_tokens"]  # each group's pairs counted once, not once per rank
    evals, base_evals = ([x[k] for x in run if "eval_loss" in x for k in ("eval_loss", "eval_logps/chosen")]
                         for run in (lines, reference[2]))  # fmt: skip
    assert len(evals) == len(base_evals) >= 2 * (STEPS + 1) and evals == pytest.approx(base_evals, abs=1e-5)
    assert (summary["num_workers"], summary["sequence_parallel_size"]) == (2, 2)


def test_tiled_mlp_under_deepspeed_changes_no_number(prepared, baseline):
    """tiled_mlp at ZeRO-2: each step's one packed row of 8 pairs is longer than twice the tiny model's hidden size
    (64), so every MLP runs in at least 3 tiles, each recomputed in backward, with DeepSpeed's gradient hooks told
    when a tile's gradient is partial; the trajectory is the untiled one."""
    _, _, lines = train(prepared, "tiled", tiled_mlp=True, zero_stage=2)
    ours, theirs = ([x for x in run if "loss" in x] for run in (lines, baseline[2]))
    assert ours[0]["num_tokens"] > 2 * 64  # the first step's row: more than two tiles
    assert [x["loss"] for x in ours] == pytest.approx([x["loss"] for x in theirs], abs=1e-5)
    assert [x["grad_norm"] for x in ours] == pytest.approx([x["grad_norm"] for x in theirs], rel=1e-5)


def test_gradient_accumulation_matches_larger_batch(prepared, baseline):
    _, _, lines = train(prepared, "ga4x2", per_device_train_batch_size=2, gradient_accumulation_steps=4)
    assert_same_trajectory(lines, baseline, prepared, "ga4x2")


def assert_same_trajectory(lines, baseline, prepared, name: str) -> None:
    """Same losses, same gradient norms (AdamW ignores a constant factor on the gradient, so a sum over ranks
    instead of a mean would leave losses and weights alike, but not the norm) and the same final weights (with
    LoRA: the adapter and the merged model)."""
    from safetensors.torch import load_file

    assert losses(lines) == pytest.approx(losses(baseline[2]), abs=2e-4)
    norms = [x["grad_norm"] for x in lines if "loss" in x]
    assert norms == pytest.approx([x["grad_norm"] for x in baseline[2] if "loss" in x], rel=1e-3)
    root, _ = prepared
    files = ["adapter_model.safetensors", "merged/model.safetensors"] if baseline[0].model.use_peft else []
    for file in files or ["model.safetensors"]:
        ours, theirs = (load_file(d / "final" / file) for d in (root / name, Path(baseline[0].data.output_dir)))
        assert ours.keys() == theirs.keys()
        assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 2e-4


def sequence_logp(model, tok, prompt: str, completion: str) -> float:
    """Sum of the completion's token log-probs (EOS included), float64, one unpadded sequence at a time."""
    start = len(tok(prompt)["input_ids"])
    ids = tok(prompt + completion + tok.eos_token)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))


@pytest.mark.parametrize("name", ["w2z2", "budget"])
def test_two_worker_eval_matches_an_independent_computation(shared_run, tiny_model_dir, name):
    """6 eval pairs on 2 workers: batches of 2 (3 batches: rank 1 runs a filler in round 2) or token-budget
    batches of uneven sizes. The final eval metrics equal the mean over the 6 pairs computed here, one pair
    at a time, from the exported policy and the reference model: no rank or batch weighs more than its pairs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, summary, _ = shared_run(name)
    final = Path(cfg.data.output_dir) / "final"
    policy = AutoModelForCausalLM.from_pretrained(final).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(final)
    margins, chosen = [], []
    for prompt, c, r in EVAL_PAIRS:
        pc, pr = sequence_logp(policy, tok, prompt, c), sequence_logp(policy, tok, prompt, r)
        rc, rr = sequence_logp(reference, tok, prompt, c), sequence_logp(reference, tok, prompt, r)
        margins.append(0.1 * ((pc - rc) - (pr - rr)))
        chosen.append(pc)
    m = torch.tensor(margins, dtype=torch.float64)
    got = summary["final_eval"]
    assert got["loss"] == pytest.approx(-torch.nn.functional.logsigmoid(m).mean().item(), abs=1e-5)
    assert got["rewards/margins"] == pytest.approx(m.mean().item(), abs=1e-6)
    assert got["rewards/accuracies"] == pytest.approx((m > 0).double().mean().item(), abs=1e-9)
    assert got["logps/chosen"] == pytest.approx(sum(chosen) / 6, abs=1e-4)
    assert m.abs().max() > 1e-3  # the policy moved: the test can tell weightings apart


def test_killed_worker_is_survived_and_resume_matches(prepared, baseline, tmp_path, monkeypatch):
    """The rank-0 worker is SIGKILLed after step 3; Ray Train restarts the group from the step-2 checkpoint."""
    root, base = prepared
    monkeypatch.setenv(FAULT_ENV, f"kill:3:{tmp_path / 'marker'}")
    _, summary, lines = train(prepared, "killed", max_failures=1)
    assert (tmp_path / "marker").exists()  # the fault really happened
    assert summary["steps_this_run"] == 2  # the restarted group resumed from the checkpoint, not from scratch
    train_steps = [x["step"] for x in lines if "loss" in x]
    assert train_steps == [1, 2, 3, 4]  # every step exactly once
    assert losses(lines) == pytest.approx(losses(baseline[2]), abs=1e-6)
    # The final weights are the uninterrupted run's (fp32, same seed): steps 3-4 were redone from the step-2
    # checkpoint with the same data. Tolerance 1e-6 absolute; a step lost or applied twice at lr 1e-3 moves
    # weights by ~1e-3.
    from safetensors.torch import load_file

    got = load_file(root / "killed" / "final" / "model.safetensors")
    want = load_file(root / "baseline" / "final" / "model.safetensors")
    assert got.keys() == want.keys() and all(t.dtype == torch.float32 for t in got.values())
    worst = max((got[k] - want[k]).abs().max().item() for k in got)
    assert worst <= 1e-6, f"final weights differ from the uninterrupted run's by {worst}"
    start = load_file(Path(base["model"]) / "model.safetensors")
    assert max((got[k] - start[k]).abs().max().item() for k in got) > 1e-4  # and training did move them


@pytest.fixture(scope="module")
def rerun(prepared, tmp_path_factory):
    """A run that fails after step 3 (max_failures 0), rerun with the same run_name: (summary, metrics lines) of the
    rerun, which finished. test_resume_checks_settings_and_restart_starts_over then reruns it once more."""
    marker = tmp_path_factory.mktemp("rerun") / "marker"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_ENV, f"raise:3:{marker}")
        with pytest.raises(Exception, match="injected failure after step 3"):
            train(prepared, "rerun", max_failures=0)
    _, summary, lines = train(prepared, "rerun", max_failures=0)
    return summary, lines


def test_rerun_with_same_name_resumes(rerun, baseline):
    """The rerun resumes from the step-2 checkpoint and ends where the uninterrupted run does."""
    summary, lines = rerun
    assert summary["steps_this_run"] == 2  # steps 3 and 4: resumed from step 2
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    assert losses(lines) == pytest.approx(losses(baseline[2]), abs=1e-6)


def test_resume_checks_settings_and_restart_starts_over(prepared, rerun, capsys):
    """The finished 4-step run above, rerun with the same run_name: beta and max_steps changed is refused with both
    keys and the ways out; only logging_steps changed resumes (nothing left to do) and says so; --restart starts
    over with the new settings."""
    root, base = prepared
    assert rerun[0]["train_steps"] == 4
    with pytest.raises(ConfigError, match=r"beta: 0.1 -> 0.5\n  max_steps: 4 -> 2\n.*--restart"):
        train(prepared, "rerun", max_failures=0, max_steps=2, beta=0.5)
    capsys.readouterr()
    _, again, _ = train(prepared, "rerun", max_failures=0, logging_steps=2)
    assert again["steps_this_run"] == 0 and "changed settings that do not alter the run: logging_steps 1 -> 2" in (
        capsys.readouterr().out
    )
    over = run_train(config_from_dict({**base, "output_dir": str(root / "rerun"), "run_name": "rerun",
                                       "max_failures": 0, "max_steps": 3, "beta": 0.5}), restart=True)  # fmt: skip
    lines = [json.loads(x) for x in (root / "rerun" / "metrics.jsonl").read_text().splitlines()]
    assert over["train_steps"] == over["steps_this_run"] == 3 and over["config"]["beta"] == 0.5
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3]


def test_token_budget_batches_on_two_workers(shared_run):
    """Micro-batches of <= 60 tokens, 2 workers x 2 accumulated: every step runs the schedule's pairs, counted
    exactly (all-reduced), and the loss starts at ln 2."""
    from pipeline.data.entries import find_tokenized
    from pipeline.data.pairs import PairTable

    cfg, summary, lines = shared_run("budget")
    assert_reference_start(lines)
    files = find_tokenized(cfg.with_absolute_paths(), cfg.data.dataset).files
    import pyarrow.parquet as pq

    pairs = PairTable.from_batches([pq.read_table(f) for f in files])
    schedule = pairs.schedule(cfg, 2)
    lengths = pairs.lengths()
    steps = schedule.steps_in_epoch(0)
    assert steps >= 2 and schedule.left_out(0) < len(pairs)
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, steps + 1))
    tokens = [int(lengths[np.concatenate(schedule.step_batches(k))].sum()) for k in range(steps)]
    assert [x["num_tokens"] for x in lines if "loss" in x] == list(np.cumsum(tokens))
    assert summary["train_steps"] == steps
    assert [x["epoch"] for x in lines if "loss" in x][-1] == 1.0


LORA = {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 1e-2}


@pytest.fixture(scope="module")
def lora_baseline(prepared):
    return train(prepared, "lora", **LORA)


def test_lora_run_exports_adapter_and_merged(lora_baseline):
    cfg, _, lines = lora_baseline
    assert_reference_start(lines)  # with a fresh adapter the policy is the base model, i.e. the reference
    assert abs(losses(lines)[2] - LN2) > 1e-3  # the adapter moved the policy
    final = Path(cfg.data.output_dir) / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    base = AutoModelForCausalLM.from_pretrained(cfg.model.model)
    changed = [n for (n, p), (_, q) in zip(merged.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)  # peft's default Llama targets


def test_lora_zero3_on_two_workers_matches_one_worker(prepared, lora_baseline):
    """LoRA freezes the LM head, which ZeRO-3 partitions too: the chunked log-prob's checkpoint recomputes the
    head in backward, and must find its weight gathered (`pipeline.models.forward.gathered_frozen_head`). Two
    workers x 4 pairs follow the 1 x 8 trajectory: losses, gradient norms, adapter and merged model."""
    _, _, lines = train(prepared, "lora-w2z3", num_workers=2, per_device_train_batch_size=4, zero_stage=3, **LORA)
    assert_reference_start(lines)
    assert_same_trajectory(lines, lora_baseline, prepared, "lora-w2z3")


def test_zero3_refuses_a_lora_wrapped_lm_head(tiny_model_dir):
    """LoRA on lm_head (lora_target_modules) leaves a frozen base weight in a PEFT layer: under ZeRO-3 (simulated by
    the ds_id that partitioning gives each weight) it is refused, as running its linear map would drop the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.errors import PipelineError
    from pipeline.models.forward import head_call, split_lm

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(target_modules=["lm_head"]))
    _, head = split_lm(model)
    assert head_call(head) is head  # not partitioned: the module itself
    head.weight.ds_id = 0
    with pytest.raises(PipelineError, match=r"plain linear map, which peft\.tuners\.lora\.layer\.Linear is not"):
        head_call(head)


@pytest.fixture(scope="module")
def tied_model(prepared, tokenizer):
    """A tiny Llama whose LM head is its input embedding (one weight), and the train and eval data scored by it."""
    from tiny_models import make_tiny_model

    root, base = prepared
    model = make_tiny_model(root / "tied-llama", tokenizer, seed=0, tie_word_embeddings=True)
    tokenize_and_score(config_from_dict({**base, "model": str(model), "output_dir": str(root / "prep-tied")}))
    return model


def test_lora_zero3_with_tied_embeddings_matches_zero2(prepared, tied_model):
    """The bug report's setup: a tied head (its weight is the input embedding's, which gradient checkpointing, on
    here as by default, gives a backward). Two workers at ZeRO-3 follow their ZeRO-2 trajectory (ZeRO-2 partitions
    no weight): losses, gradient norms, adapter and merged model, which is the trained one, far from the base model
    next to the 2e-4 tolerance."""
    from safetensors.torch import load_file

    runs = {
        stage: train(
            prepared,
            f"lora-tied-w2z{stage}",
            model=str(tied_model),
            num_workers=2,
            per_device_train_batch_size=4,
            zero_stage=stage,
            gradient_checkpointing=True,
            **LORA,
        )
        for stage in (2, 3)
    }
    for _, _, lines in runs.values():
        assert_reference_start(lines)
    assert_same_trajectory(runs[3][2], runs[2], prepared, "lora-tied-w2z3")
    merged = load_file(Path(runs[3][0].data.output_dir) / "final" / "merged" / "model.safetensors")
    base = load_file(tied_model / "model.safetensors")
    assert merged.keys() == base.keys() and "lm_head.weight" not in base  # saved once, as the embedding
    assert max((merged[k] - base[k]).abs().max().item() for k in base) > 1e-3


def test_bad_setups_are_clear_errors(prepared, tmp_path):
    _, base = prepared
    with pytest.raises(
        ConfigError,
        match=r"needs num_workers x per_device_train_batch_size x .* = 64 pairs, but "
        r"the training data has 32",
    ):
        run_train(
            config_from_dict({**base, "output_dir": str(tmp_path), "per_device_train_batch_size": 32, "num_workers": 2})
        )
    with pytest.raises(CacheError, match=r"Produce it with `dpo-pipeline tokenize`"):
        run_train(config_from_dict({**base, "output_dir": str(tmp_path), "max_length": 9}))
    with pytest.raises(CacheError, match=r"Produce it with `dpo-pipeline score-ref`.* dtype bfloat16"):
        run_train(config_from_dict({**base, "output_dir": str(tmp_path), "dtype": "bfloat16"}))
