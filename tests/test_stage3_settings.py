"""Stage 3 beyond the defaults, end to end on a real local Ray with real DeepSpeed on CPU and a tiny random Llama:
gradient checkpointing on (the default), a cosine schedule with warm-up and weight decay, bfloat16 on CPU, and
LoRA with a `ref_model` that is not `model`.

Four training runs: cosine + weight decay with gradient checkpointing on and the same run with it off (6 steps
each), bfloat16 (1 step), LoRA against another reference (1 step).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from colour_pairs import EVAL_PAIRS, tokenize_and_score
from test_stage3_train import train  # the same run-and-read-metrics helper

from pipeline import schema
from pipeline.config import config_from_dict
from pipeline.data.entries import find_tokenized
from pipeline.errors import CacheError

pytestmark = pytest.mark.slow

LN2 = math.log(2.0)
PEAK_LR = 1e-3
WEIGHT_DECAY = 1.0
STEPS = 6
WARMUP = 2  # warmup_ratio 0.25 of 6 steps, rounded up as transformers does: ceil(1.5)


@pytest.fixture(scope="module")
def prepared(colour_pairs, tiny_model_dir, tmp_path_factory):
    """Tokenized train (32 pairs) and eval (6 pairs) data, scored in float32 by `model`, in this module's copy of the
    cache."""
    root = tmp_path_factory.mktemp("settings")
    shutil.copytree(colour_pairs.cache, root / "cache")
    base = {
        "model": str(tiny_model_dir),
        "cache_dir": str(root / "cache"),
        "dataset": [str(colour_pairs.train)],
        "eval_dataset": [str(colour_pairs.eval)],
        "max_steps": STEPS,
        "learning_rate": PEAK_LR,
        "per_device_train_batch_size": 8,
        "logging_steps": 1,
        "eval_steps": 1000,  # eval at step 0 and at the end only
        "zero_stage": 0,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.25,
        "weight_decay": WEIGHT_DECAY,
        "max_grad_norm": 1.0,
    }
    return root, base


def score(prepared, **overrides) -> None:
    """Stage 1 (reused once made) and stage 2 for both splits under `overrides` (dtype, ref_model)."""
    root, base = prepared
    tokenize_and_score(config_from_dict({**base, "output_dir": str(root / "prep"), **overrides}))


def train_lines(lines):
    return [x for x in lines if "loss" in x]


def step0_eval(lines):
    first = next(x for x in lines if "eval_loss" in x)
    assert first["step"] == 0
    return first


def final_weights(cfg):
    from safetensors.torch import load_file

    return load_file(Path(cfg.data.output_dir) / "final" / "model.safetensors")


# --- gradient checkpointing, cosine schedule, weight decay: one 6-step run, and the same with checkpointing off ---


@pytest.fixture(scope="module")
def cosine_runs(prepared):
    return train(prepared, "cosine-gc"), train(prepared, "cosine-nogc", gradient_checkpointing=False)


def test_gradient_checkpointing_is_on_by_default_and_changes_no_number(prepared, cosine_runs, tiny_model_dir):
    """Recomputing activations in backward runs the same float32 ops on the same tensors again, so losses, gradient
    norms and final weights match the run that keeps them, to float32 rounding (1e-5 on losses, 1e-5 relative on
    norms, 1e-6 on weights after 6 steps at lr 1e-3)."""
    from pipeline.train.engine import build_policy

    (gc_cfg, _, gc_lines), (off_cfg, _, off_lines) = cosine_runs
    assert gc_cfg.model.gradient_checkpointing and not off_cfg.model.gradient_checkpointing
    # the setting reaches the model the workers build (the worker calls the same build_policy)
    assert build_policy(gc_cfg, str(tiny_model_dir))[0].is_gradient_checkpointing
    assert not build_policy(off_cfg, str(tiny_model_dir))[0].is_gradient_checkpointing

    gc, off = train_lines(gc_lines), train_lines(off_lines)
    assert [x["step"] for x in gc] == [x["step"] for x in off] == list(range(1, STEPS + 1))
    assert [x["loss"] for x in gc] == pytest.approx([x["loss"] for x in off], abs=1e-5)
    assert [x["grad_norm"] for x in gc] == pytest.approx([x["grad_norm"] for x in off], rel=1e-5)
    assert max(abs(x["loss"] - LN2) for x in gc) > 1e-3  # the policy moved, so the comparison has teeth
    ours, theirs = final_weights(gc_cfg), final_weights(off_cfg)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-6


def cosine_multiplier(s: int) -> float:
    """transformers' cosine schedule with linear warm-up, written out: s/W during warm-up, then half a cosine from
    1 at step W down to 0 at the last step."""
    if s < WARMUP:
        return s / WARMUP
    return 0.5 * (1.0 + math.cos(math.pi * (s - WARMUP) / (STEPS - WARMUP)))


def test_cosine_schedule_with_warmup_logs_the_formula(cosine_runs):
    """The rate logged after step s is the one the scheduler set for the next step, peak x multiplier(s):
    by hand, 0.5, 1, (1 + cos(pi/4))/2, 0.5, (1 - cos(pi/4))/2, 0."""
    for _, _, lines in cosine_runs:
        lrs = [x["learning_rate"] for x in train_lines(lines)]
        c = math.cos(math.pi / 4)
        assert [cosine_multiplier(s) for s in range(1, STEPS + 1)] == pytest.approx(
            [0.5, 1.0, (1 + c) / 2, 0.5, (1 - c) / 2, 0.0], abs=1e-15
        )
        assert lrs == pytest.approx([PEAK_LR * cosine_multiplier(s) for s in range(1, STEPS + 1)], abs=1e-12)


def test_weight_decay_shrinks_untouched_weights_by_adamw_factor(prepared, cosine_runs, tiny_model_dir):
    """An embedding row of a token that never occurs in the training data gets an exactly zero gradient, so
    AdamW's moments stay 0 and its Adam update is 0/(0 + eps) = 0: only the decoupled decay moves it,
    p <- p * (1 - lr_k * weight_decay) at step k, where lr_k = peak x multiplier(k - 1) (the scheduler steps
    after the optimizer). After 6 steps every such row is its initial value times the product of those factors
    (1 - 3e-3 here, the multipliers summing to 3); float32 rounding over 6 multiplications is ~4e-7 relative."""
    from safetensors.torch import load_file

    cfg, _, _ = cosine_runs[0]
    tokenized = find_tokenized(cfg.with_absolute_paths(), cfg.data.dataset)
    used: set[int] = set()
    for f in tokenized.files:
        table = pq.read_table(f, columns=[schema.CHOSEN_INPUT_IDS, schema.REJECTED_INPUT_IDS])
        for column in table.columns:
            for ids in column.to_pylist():
                used.update(ids)
    start = load_file(Path(tiny_model_dir) / "model.safetensors")["model.embed_tokens.weight"]
    end = final_weights(cfg)["model.embed_tokens.weight"]
    unused = torch.ones(start.shape[0], dtype=torch.bool)
    unused[sorted(used)] = False
    assert 0 < len(used) < 500 and unused.sum() > 40_000

    factor = math.prod(1.0 - PEAK_LR * cosine_multiplier(k - 1) * WEIGHT_DECAY for k in range(1, STEPS + 1))
    assert factor == pytest.approx(1 - 3e-3, abs=1e-5)
    assert torch.allclose(end[unused].double(), start[unused].double() * factor, rtol=1e-6, atol=1e-9)
    # rows of tokens that were trained on moved by their Adam updates too (up to lr per step), not by decay alone
    moved = (end[~unused].double() - start[~unused].double() * factor).abs().max().item()
    assert moved > 1e-4


# --- bfloat16 on CPU ---


def test_bfloat16_run_starts_at_ln2(prepared, cosine_runs, tiny_model_dir):
    """dtype bfloat16: the reference is scored in bfloat16 too (stage 2's cache is keyed by dtype) by the same
    forward and log-prob code, so at step 1 the policy is the reference rounding for rounding: loss ln 2 and
    rewards 0 to float32 rounding of the final sums (1e-5, as in float32). Not a looser "bf16 rounding" tolerance:
    one bf16 rounding apart is already ~1e-4 in rewards on these pairs (measured below, the same sequences scored
    in bfloat16 and float32), so a tolerance of that size could not tell a reference rounded differently from the
    policy. The gradient is bfloat16's: step 1's norm is the float32 run's (same pairs) within bf16's 2^-8 relative
    precision, times a few for the accumulation, but not equal to it; the exported weights are bfloat16."""
    score(prepared, dtype="bfloat16")
    cfg, _, lines = train(prepared, "bf16", dtype="bfloat16", max_steps=1)
    assert cfg.compute_dtype == "bfloat16"
    first, step0 = train_lines(lines)[0], step0_eval(lines)
    assert first["step"] == 1 and abs(first["loss"] - LN2) < 1e-5
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    assert abs(step0["eval_loss"] - LN2) < 1e-5 and step0["eval_rewards/accuracies"] == 0.0
    assert abs(step0["eval_rewards/chosen"]) < 1e-5 and abs(step0["eval_rewards/rejected"]) < 1e-5

    fp32_norm = train_lines(cosine_runs[1][2])[0]["grad_norm"]  # float32, step 1, the same 8 pairs
    assert first["grad_norm"] == pytest.approx(fp32_norm, rel=1e-2) and first["grad_norm"] != fp32_norm
    assert {t.dtype for t in final_weights(cfg).values()} == {torch.bfloat16}

    # the tolerance has teeth: a float32 reference for a bfloat16 policy would give rewards far above 1e-5
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    models = [
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=d).eval() for d in (torch.bfloat16, torch.float32)
    ]
    gaps = [
        0.1 * (sequence_logp(models[0], tok, prompt, c) - sequence_logp(models[1], tok, prompt, c))
        for prompt, c, r in EVAL_PAIRS
    ]
    assert max(abs(g) for g in gaps) > 1e-4


# --- LoRA with ref_model other than model ---


def test_lora_with_another_ref_model_scores_against_that_model(prepared, tiny_model_dir, tokenizer):
    """use_peft with ref_model != model is accepted and the reference is `ref_model`, as TRL 1.16 does with an
    explicit ref_model (DPOTrainer only falls back to the adapter-disabled base model when ref_model is None),
    and as the README's `ref_model` row says.

    Shown three ways: stage 3 asks for `ref_model`'s scores although the base model's are cached; the run records
    that reference entry; and the step-0 eval (a fresh adapter: the policy is the base model) equals the DPO loss
    computed here, one pair at a time in float64, against `ref_model`, far from the ln 2 the base model gives."""
    from tiny_models import make_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = prepared
    other = make_tiny_model(root / "other-ref", tokenizer, seed=1)
    # beta 1: two random tiny models give nearly uniform log-probs, so the rewards they differ by need magnifying
    lora = {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "ref_model": str(other), "beta": 1.0}
    with pytest.raises(CacheError, match=rf"score-ref`.* for reference model {re.escape(str(other))} and dtype"):
        train(prepared, "lora-unscored", max_steps=1, **lora)

    score(prepared, ref_model=str(other))
    cfg, summary, lines = train(prepared, "lora-ref", max_steps=1, **lora)
    assert cfg.model.use_peft and cfg.ref_model_name == str(other)
    for split in ("train", "eval"):
        manifest = json.loads((Path(summary["inputs"][split]["reference"]) / "manifest.json").read_text())
        assert manifest["reference_model"] == str(other)
    assert (Path(cfg.data.output_dir) / "final" / "adapter_model.safetensors").is_file()

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(other).eval()
    chosen, rejected = [], []
    for prompt, c, r in EVAL_PAIRS:
        chosen.append(sequence_logp(policy, tok, prompt, c) - sequence_logp(reference, tok, prompt, c))  # beta 1
        rejected.append(sequence_logp(policy, tok, prompt, r) - sequence_logp(reference, tok, prompt, r))
    rc, rr = torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)
    want = -torch.nn.functional.logsigmoid(rc - rr).mean().item()
    got = step0_eval(lines)
    assert abs(want - LN2) > 2e-3  # against the base model it would be ln 2: the two readings differ
    assert got["eval_loss"] == pytest.approx(want, abs=1e-5)
    assert got["eval_rewards/chosen"] == pytest.approx(rc.mean().item(), abs=1e-5)
    assert got["eval_rewards/rejected"] == pytest.approx(rr.mean().item(), abs=1e-5)
    assert abs(got["eval_rewards/chosen"]) > 0.1  # 0 if the base model were the reference
    assert got["eval_rewards/accuracies"] == pytest.approx((rc > rr).double().mean().item(), abs=1e-9)
    first = train_lines(lines)[0]
    assert abs(first["loss"] - LN2) > 2e-3 and abs(first["rewards/chosen"]) > 1e-3


def sequence_logp(model, tok, prompt: str, completion: str) -> float:
    """Sum of the completion's token log-probs (EOS included), float64, one unpadded sequence at a time."""
    start = len(tok(prompt)["input_ids"])
    ids = tok(prompt + completion + tok.eos_token)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))
