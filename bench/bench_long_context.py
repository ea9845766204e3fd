"""Per-worker memory of one training micro-step on one long pair, whole (k = 1) and split over two workers (k = 2).

    .venv/bin/python bench/bench_long_context.py --lengths 8192 16384 32768 65536 --budget-mb 1024 \
        --score-length 131072

For each pair length L (chosen and rejected L/2 tokens each, the last 3/4 of each the completion) and each
sequence_parallel_size k, fresh processes joined in a gloo group (`tests/process_group.py`, as Ray Train joins
its workers) build the same random Llama, run stage 3's forward on the pair (`sequence_forward`: packed row,
per-sequence SDPA, gradient checkpointing, chunked LM head; with k = 2 each rank holds half of every sequence
and trades heads for positions in Ulysses' all-to-all), the sigmoid loss against zero reference scores and the
backward. Each rank reports its growth in resident memory over the process right after a short warm-up step
(what the step's activations and their gradients cost: weights, gradients and libraries are already there;
glibc's malloc is told to return big freed blocks, `MALLOC_ENV` of bench_model_size.py, else its heap keeps
them and the growth measures the allocator as much as the step),
its peak RSS and the step's seconds. The longest L whose growth stays within --budget-mb is what fits the budget.
--score-length also scores one pair as stage 2 does (no gradient) and compares its memory with its logits' size.
--tiled-mlp runs every MLP in tiles of ~hidden positions (`tiled_mlp: true`, `pipeline.models.tiling`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_model_size import MALLOC_ENV
from bench_train_memory import current_rss_mb
from process_group import run_ranks


def pair_columns(length: int, vocab: int) -> dict[str, list]:
    import torch

    half = length // 2
    prompt = half // 4
    g = torch.Generator().manual_seed(0)
    chosen, rejected = (torch.randint(3, vocab, (half,), generator=g).tolist() for _ in range(2))
    rejected[:prompt] = chosen[:prompt]
    return {
        "chosen_input_ids": [chosen],
        "rejected_input_ids": [rejected],
        "chosen_completion_start": [prompt],
        "rejected_completion_start": [prompt],
    }


def random_llama(length: int, hidden: int, layers: int, vocab: int) -> Any:
    """The bench's random Llama (seed 0), attention on packed rows (`pipeline.models.kernels`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.models.kernels import VARLEN_SDPA, register_varlen_sdpa

    torch.manual_seed(0)
    register_varlen_sdpa()
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=length,
    )
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(VARLEN_SDPA)
    return model


def one_step(rank: int, world: int, length: int, hidden: int, layers: int, vocab: int, tiled: bool = False) -> dict:
    import torch

    from pipeline.config import LossConfig
    from pipeline.core.losses import PreferenceInputs, dpo_loss
    from pipeline.models.forward import collate_pairs, sequence_forward
    from pipeline.models.kernels import VARLEN_SDPA
    from pipeline.models.sequence_parallel import enable_ulysses, sequence_group
    from pipeline.models.tiling import tile_mlps

    model = random_llama(length, hidden, layers, vocab).train()
    if tiled:
        tile_mlps(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    group = None
    if world > 1:
        group = sequence_group(world)
        enable_ulysses(model.config, VARLEN_SDPA, group)

    def step(n_tokens: int) -> float:
        batch = collate_pairs(pair_columns(n_tokens, vocab), 0)
        stats = sequence_forward(model, batch, padding_free=True, group=group)
        zero = torch.zeros(1)
        x = PreferenceInputs(stats.logps[:1], stats.logps[1:], zero, zero, stats.tokens[:1], stats.tokens[1:])
        loss = dpo_loss(LossConfig(), x).loss
        loss.backward()
        model.zero_grad(set_to_none=False)
        return float(loss.detach())

    step(256)  # warm-up: gradients allocated, kernels loaded
    base = current_rss_mb()
    start = time.perf_counter()
    loss = step(length)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rank": rank, "base_mb": base, "peak_mb": peak, "growth_mb": peak - base, "seconds": seconds, "loss": loss}


def one_score(rank: int, world: int, length: int, hidden: int, layers: int, vocab: int) -> dict:
    """Stage 2's scoring of one pair of `length` tokens (`sequence_forward` under inference mode, packed row, the
    chunked LM head), against the size its logits would have: length x vocab float32."""
    import torch

    from pipeline.models.forward import collate_pairs, sequence_forward

    model = random_llama(length, hidden, layers, vocab).eval()
    with torch.inference_mode():
        sequence_forward(model, collate_pairs(pair_columns(256, vocab), 0), padding_free=True)
        base = current_rss_mb()
        start = time.perf_counter()
        stats = sequence_forward(model, collate_pairs(pair_columns(length, vocab), 0), padding_free=True)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "length": length,
        "growth_mb": peak - base,
        "peak_mb": peak,
        "seconds": seconds,
        "logits_mb": length * vocab * 4 / 2**20,
        "logps": stats.logps.tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[8192, 16384, 32768, 65536], help="pair lengths to train")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2], help="sequence_parallel_size values")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--tiled-mlp", action="store_true", help="run the MLPs in tiles (tiled_mlp: true)")
    ap.add_argument("--budget-mb", type=float, default=1024.0, help="activation memory per worker")
    ap.add_argument("--score-length", type=int, default=0, help="also score one pair this long, as stage 2 does")
    ap.add_argument("--score-vocab", type=int, default=32768, help="the scored model's vocabulary (logits' width)")
    ap.add_argument("--out", default="bench/results_long_context.json")
    args = ap.parse_args()
    os.environ.update(MALLOC_ENV)  # the ranks' malloc returns big freed blocks: RSS follows what is held

    scored = None
    if args.score_length:
        scored = run_ranks(one_score, 1, args.score_length, args.hidden, args.layers, args.score_vocab, timeout=3600)[0]
        print(
            f"stage 2, one pair of {args.score_length} tokens: +{scored['growth_mb']:.0f} MiB over the loaded model, "
            f"in {scored['seconds']:.0f} s; its logits alone would take {scored['logits_mb']:.0f} MiB",
            flush=True,
        )

    rows = []
    if args.lengths:
        print(f"{'k':>2} {'pair tokens':>11} {'growth MiB/worker':>18} {'peak RSS MiB':>13} {'step s':>7} {'loss':>8}")
    for k in args.k:
        for length in args.lengths:
            ranks = run_ranks(one_step, k, length, args.hidden, args.layers, args.vocab, args.tiled_mlp, timeout=3600)
            worst = max(ranks, key=lambda r: r["growth_mb"])
            row = {"k": k, "length": length, "ranks": ranks, "growth_mb": worst["growth_mb"]}
            rows.append(row)
            print(
                f"{k:>2} {length:>11} {worst['growth_mb']:>18.0f} {worst['peak_mb']:>13.0f} "
                f"{max(r['seconds'] for r in ranks):>7.1f} {worst['loss']:>8.5f}",
                flush=True,
            )
    for k in args.k if rows else ():
        fits = [r["length"] for r in rows if r["k"] == k and r["growth_mb"] <= args.budget_mb]
        print(f"k={k}: longest pair within {args.budget_mb:.0f} MiB of activations per worker: {max(fits, default=0)}")
    for length in args.lengths:
        by_k = {r["k"]: r["growth_mb"] for r in rows if r["length"] == length}
        if 1 in by_k and 2 in by_k:
            print(f"{length} tokens: k=2 / k=1 activation memory per worker = {by_k[2] / by_k[1]:.2f}")
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "scored": scored}, indent=1) + "\n")


if __name__ == "__main__":
    main()
