"""Padding-free rows: packing by hand, per-sequence attention, and equality with the padded path (values and
gradients) on a real tiny Llama loaded like a real model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.core.packing import pack
from pipeline.errors import ConfigError
from pipeline.models.forward import collate_pairs, sequence_forward
from pipeline.models.kernels import VARLEN_SDPA, choose_kernels
from pipeline.models.loading import load_causal_lm


def _columns(chosen: list[list[int]], rejected: list[list[int]], starts: list[tuple[int, int]]) -> dict:
    return {
        "chosen_input_ids": chosen,
        "rejected_input_ids": rejected,
        "chosen_completion_start": [s[0] for s in starts],
        "rejected_completion_start": [s[1] for s in starts],
    }


def _random_pairs(n: int, seed: int, vocab: int = 400) -> dict:
    g = torch.Generator().manual_seed(seed)
    chosen, rejected, starts = [], [], []
    for _ in range(n):
        prompt = int(torch.randint(2, 30, (1,), generator=g))
        lc, lr = (int(x) for x in torch.randint(1, 40, (2,), generator=g))
        p = torch.randint(5, vocab, (prompt,), generator=g).tolist()
        chosen.append(p + torch.randint(5, vocab, (lc,), generator=g).tolist())
        rejected.append(p + torch.randint(5, vocab, (lr,), generator=g).tolist())
        starts.append((prompt, prompt))
    return _columns(chosen, rejected, starts)


def _models(model_dir, dtype: str = "float32"):
    cfg = ModelConfig()
    packed = choose_kernels(cfg, cuda=False, dtype=dtype)
    padded = choose_kernels(dataclasses.replace(cfg, padding_free=False), cuda=False, dtype=dtype)
    return (
        load_causal_lm(str(model_dir), dtype, attn_implementation=padded.attn_implementation),
        load_causal_lm(str(model_dir), dtype, attn_implementation=packed.attn_implementation),
    )


def test_pack_by_hand():
    batch = collate_pairs(_columns([[5, 6, 7], [8, 9]], [[5, 6, 7, 4], [8, 3, 2]], [(1, 1), (1, 1)]), pad_token_id=0)
    row = pack(batch)
    # rows: chosen0 (3), chosen1 (2), rejected0 (4), rejected1 (3)
    assert row.input_ids.tolist() == [[5, 6, 7, 8, 9, 5, 6, 7, 4, 8, 3, 2]]
    assert row.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]]
    assert row.cu_seq_lens.tolist() == [0, 3, 5, 9, 12]
    assert row.max_length == 4


def test_kernel_choice_on_cpu():
    k = choose_kernels(ModelConfig(), cuda=False, dtype="float32")
    assert (k.attn_implementation, k.padding_free, k.liger) == (VARLEN_SDPA, True, False)
    k = choose_kernels(ModelConfig(padding_free=False), cuda=False, dtype="float32")
    assert k.attn_implementation == "sdpa"
    assert "right-padded" in k.describe()
    with pytest.raises(ConfigError, match="flash-attn"):
        choose_kernels(ModelConfig(attn_implementation="flash_attention_2"), cuda=False, dtype="bfloat16")
    with pytest.raises(ConfigError, match="liger-kernel"):
        choose_kernels(ModelConfig(use_liger_kernel=True), cuda=False, dtype="float32")
    with pytest.raises(ConfigError, match="eager"):
        ModelConfig(attn_implementation="eager")


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 2e-4)])
def test_packed_equals_padded_values_and_gradients(tiny_model_dir, dtype, tol):
    """Sums of up to ~40 token log-probs (about -6 nats each): float32 rounding differs by ~1e-5 relative."""
    padded_model, packed_model = _models(tiny_model_dir, dtype)
    batch = collate_pairs(_random_pairs(6, seed=1), pad_token_id=0)
    assert batch.attention_mask.float().mean() < 0.9  # real padding in the padded layout

    results = []
    for model, padding_free in ((padded_model, False), (packed_model, True)):
        model.zero_grad()
        stats = sequence_forward(model, batch, with_metrics=True, padding_free=padding_free)
        (stats.logps.sum() + 0.5 * stats.shared_logps.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((stats, grads))
    (a, ga), (b, gb) = results
    for field in ("logps", "shared_logps", "tail_logps", "wpo_logps", "logits_sum", "entropy_sum"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=0, atol=tol, msg=field)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.top1_hits, b.top1_hits)
    for name in ga:
        scale = ga[name].abs().max().item() + 1e-12
        assert (gb[name] - ga[name]).abs().max().item() <= 50 * tol * scale, name


def test_attention_never_crosses_a_sequence(tiny_model_dir):
    """Changing every token of one packed sequence leaves every other sequence's log-probs unchanged."""
    _, model = _models(tiny_model_dir, "float64")
    cols = _random_pairs(4, seed=2)
    base = sequence_forward(model, collate_pairs(cols, 0), padding_free=True).logps
    cols["chosen_input_ids"][1] = [t + 1 for t in cols["chosen_input_ids"][1]]  # sequence 1 of 8
    changed = sequence_forward(model, collate_pairs(cols, 0), padding_free=True).logps
    others = [i for i in range(8) if i != 1]
    assert torch.equal(changed[others], base[others])
    assert changed[1] != base[1]


def test_varlen_attention_refuses_a_padded_batch(tiny_model_dir):
    _, model = _models(tiny_model_dir)
    with pytest.raises(RuntimeError, match="packed rows only"):
        sequence_forward(model, collate_pairs(_random_pairs(2, seed=3), 0), padding_free=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_and_liger_match_padded_sdpa_on_gpu(tiny_model_dir):
    """bf16 flash-attention-2 varlen + Liger kernels against padded SDPA, both on the GPU."""
    from pipeline.models.kernels import apply_liger, flash_attn_available, liger_available

    if not (flash_attn_available() and liger_available()):
        pytest.skip("needs the gpu extra (flash-attn, liger-kernel)")
    fast = choose_kernels(ModelConfig(), cuda=True, dtype="bfloat16")
    assert fast.attn_implementation == "flash_attention_2" and fast.liger
    model = load_causal_lm(str(tiny_model_dir), "bfloat16", attn_implementation=fast.attn_implementation).cuda()
    apply_liger(model, fast)
    reference = load_causal_lm(str(tiny_model_dir), "bfloat16", attn_implementation="sdpa").cuda()
    batch = collate_pairs(_random_pairs(6, seed=4), 0)
    a = sequence_forward(reference, batch).logps
    b = sequence_forward(model, batch, padding_free=True).logps
    torch.testing.assert_close(b, a, rtol=2e-2, atol=0.5)  # bf16 sums over up to ~40 tokens
