"""The prepared GPU check: numerics and speed of our forward, loss and kernels on one CUDA device, in one run.

    python bench/gpu_check.py --wheels bench/wheels --out $OUT/gpu_check.json

Written for a borrowed machine with torch, transformers, peft, pyarrow and triton only: no Ray, no DeepSpeed,
no network, no weights. Every model is a random Llama built here; the code under test is the pure core
(`pipeline.core`), `pipeline.models.forward` and `pipeline.models.kernels`, imported as the trainer imports them.
Rows, in the printed table:
  1  bf16 per-sequence log-probs of the padding-free packed path against the right-padded SDPA path
     (`sequence_forward`, same model, same pairs of varied lengths), within 3x bf16's own error;
  2  step 1 of DPO in bf16: policy = reference, reference scored under no_grad by the same function, sigmoid
     `dpo_loss` = ln 2 and rewards 0; the backward gives finite gradients;
  3  Liger's patched model (`apply_liger`) against the plain one, same tolerance as row 1; the wheel is
     installed from --wheels into a temporary folder when liger_kernel is not importable;
  4  tokens/s, MFU and peak memory of one train micro-step (forward through `sequence_forward`, `dpo_loss`,
     backward; bf16 weights, no optimizer, no gradient checkpointing) on random Llamas of SmolLM2-135M's
     and Llama-3.2-1B's shapes, packed rows; padded rows too for the 135M shape, Liger too when present;
  5  nothing imported Ray, DeepSpeed, `pipeline.config` or a stage;
  6  long context: tokens/s and peak memory of one train micro-step on ONE pair of 64k tokens (32k chosen, 32k
     rejected, sharing an 8k prompt), Llama-3.2-1B's shape, packed row, flash-attention where installed,
     gradient checkpointing on as the trainer runs it, sequence_parallel_size 1 (one GPU);
  7  the same with activation_offloading: the saved tensors (the activation checkpoints) in pinned host memory
     (`pipeline.train.step.saved_for_backward_in_host_memory`, re-implemented here: this script imports no train
     module): its peak memory and tokens/s beside row 6's.
MFU = model FLOPs / step time / --peak-tflops (989: H200 SXM dense bf16, NVIDIA's datasheet; 1,979 is the
sparse figure). Model FLOPs per step, forward + backward = 3x forward, counting only real (non-pad) tokens:
  6 x body matmul params x tokens  +  6 x hidden x vocab x scored completion tokens (the only ones that reach
  the LM head)  +  causal attention 6 x L^2 x (heads x head_dim) per sequence and layer (QK^T and AV, half
  of each masked: half of PaLM's 12 x L^2 x d). The JSON also gives flops_6nd = 6 x all params x tokens.
--smoke runs every row on tiny models in a few seconds, on CPU in float32 (bf16 on CUDA), so a CPU test
keeps this script from rotting (tests/test_gpu_check.py). Exit status: 0 all rows pass or are skipped,
1 a row failed, 2 no CUDA device without --smoke.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/gpu_check.py`: the repo root holds `pipeline`
    sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from pipeline import schema  # noqa: E402
from pipeline.core.logprobs import SequenceStats  # noqa: E402
from pipeline.core.losses import PreferenceInputs, dpo_loss  # noqa: E402
from pipeline.core.packing import PairBatch  # noqa: E402
from pipeline.models.forward import collate_pairs, sequence_forward  # noqa: E402
from pipeline.models.kernels import Kernels, apply_liger, choose_kernels, liger_available  # noqa: E402

if TYPE_CHECKING:
    from pipeline.config import ModelConfig  # for the type checker only: this script must not import the config

H200_BF16_DENSE_TFLOPS = 989.0
FLOOR_FACTOR = 3.0  # two bf16 paths each within e of float64 differ by ≤ 2e; 3e leaves room for kernel spread
FORBIDDEN_MODULES = ("ray", "deepspeed", "pipeline.config", "stages")  # absent there, or the wrong layer


def parse_args() -> argparse.Namespace:
    out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else ROOT / "bench/results_gpu_check.json"
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p.add_argument("--out", default=str(out), help=f"JSON results file (default {out})")
    p.add_argument("--wheels", default=str(ROOT / "bench/wheels"), help="folder with the liger-kernel wheel")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--smoke", action="store_true", help="tiny models, a few seconds, CPU allowed")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS, help="device peak for MFU")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per model (default 3; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model (default 10; smoke 2)")
    return p.parse_args()


# --- settings: model shapes, batches, the loss and kernel stand-ins ---


@dataclass(frozen=True)
class Shape:
    """A Llama architecture; every model here ties its input and output embeddings."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


SMOLLM2_135M = Shape("SmolLM2-135M", hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152)
LLAMA_1B = Shape("Llama-3.2-1B", hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256)
TINY = Shape("tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512)
TINY_WIDE = Shape("tiny-wide", hidden=128, layers=2, heads=8, kv_heads=2, intermediate=256, vocab=1024)


@dataclass(frozen=True)
class Pairs:
    """Random pairs: each pair shares a prompt; lengths drawn uniformly from the closed ranges."""

    n: int
    prompt: tuple[int, int]
    completion: tuple[int, int]


CHECK_PAIRS, CHECK_PAIRS_SMOKE = Pairs(16, (8, 384), (1, 384)), Pairs(4, (2, 20), (1, 20))
SPEED_PAIRS, SPEED_PAIRS_SMOKE = Pairs(16, (64, 512), (32, 512)), Pairs(2, (4, 24), (4, 24))
LONG_PAIR, LONG_PAIR_SMOKE = Pairs(1, (8192, 8192), (24576, 24576)), Pairs(1, (256, 256), (768, 768))


@dataclass(frozen=True)
class SigmoidDPO:
    """Satisfies `pipeline.core.losses.LossSettings`: TRL's defaults, sigmoid loss only."""

    beta: float = 0.1
    loss_type: tuple[str, ...] = ("sigmoid",)
    weights: tuple[float, ...] = (1.0,)
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    f_divergence_clamp: bool = False
    use_weighting: bool = False
    discopop_tau: float = 0.05
    cpo_beta: float | None = None
    cpo_alpha: float = 1.0
    simpo_gamma: float = 0.5
    alphapo_alpha: float = 0.0
    orpo_lambda: float = 0.1


@dataclass(frozen=True)
class KernelRequest:
    """The three attributes of `pipeline.config.ModelConfig` that `choose_kernels` reads (no config import)."""

    attn_implementation: str = "auto"
    use_liger_kernel: bool | None = False  # Liger is row 3's business, turned on there explicitly
    padding_free: bool = True


def kernels_for(request: KernelRequest, cuda: bool, dtype: str) -> Kernels:
    """`choose_kernels` on the stand-in; it reads only these three attributes of its `ModelConfig`."""
    return choose_kernels(cast("ModelConfig", request), cuda=cuda, dtype=dtype)


# --- random models and batches ---


def build_model(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """A random tied-embedding Llama, initialised on the device in float32 then cast (fast even at 1B)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return to_dtype(model, dtype)


def to_dtype(model: LlamaForCausalLM, dtype: torch.dtype) -> LlamaForCausalLM:
    """The model in `dtype` as `from_pretrained(dtype=...)` loads it, in place: weights in `dtype`, RoPE's
    `inv_freq` buffers kept float32 (a plain `.to(bfloat16)` would round the frequencies, an error the trainer's
    models never have)."""
    keep = {name: buf for name, buf in model.named_buffers() if name.endswith("inv_freq")}
    torch.nn.Module.to(model, dtype=dtype)  # through nn.Module: transformers' wrapper of `.to` defeats mypy
    for name, buf in keep.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, buf)
    return model


def random_pairs(spec: Pairs, vocab: int, seed: int) -> PairBatch:
    """A PairBatch through `collate_pairs`, the trainer's collator, from schema-named columns."""
    g = torch.Generator().manual_seed(seed)

    def draw(lo_hi: tuple[int, int]) -> int:
        return int(torch.randint(lo_hi[0], lo_hi[1] + 1, (1,), generator=g))

    def tokens(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()  # 0-2 are pad/bos/eos

    chosen, rejected, starts = [], [], []
    for _ in range(spec.n):
        prompt = tokens(draw(spec.prompt))
        chosen.append(prompt + tokens(draw(spec.completion)))
        rejected.append(prompt + tokens(draw(spec.completion)))
        starts.append(len(prompt))
    columns: dict[str, Sequence[Any]] = {
        schema.CHOSEN_INPUT_IDS: chosen,
        schema.REJECTED_INPUT_IDS: rejected,
        schema.CHOSEN_COMPLETION_START: starts,
        schema.REJECTED_COMPLETION_START: starts,
    }
    return collate_pairs(columns, pad_token_id=0)


def logps(model: LlamaForCausalLM, batch: PairBatch, kernels: Kernels, grad: bool = False) -> SequenceStats:
    """`sequence_forward` with the model switched to the attention that `kernels` names."""
    model.set_attn_implementation(kernels.attn_implementation)
    with torch.set_grad_enabled(grad):
        return sequence_forward(model, batch, padding_free=kernels.padding_free)


def preference_inputs(policy: SequenceStats, ref_logps: Tensor) -> PreferenceInputs:
    """Rows [0, B) chosen, [B, 2B) rejected, as `collate_pairs` lays them out."""
    b = policy.logps.numel() // 2
    return PreferenceInputs(
        policy_chosen_logps=policy.logps[:b],
        policy_rejected_logps=policy.logps[b:],
        ref_chosen_logps=ref_logps[:b],
        ref_rejected_logps=ref_logps[b:],
        chosen_tokens=policy.tokens[:b],
        rejected_tokens=policy.tokens[b:],
    )


# --- rows 1-3: numerics ---


@dataclass
class Row:
    key: str
    check: str
    status: str = "ERROR"  # PASS, FAIL, SKIP (skipped: why), INFO (a measurement), ERROR (an exception)
    result: str = ""
    bound: str = ""
    data: dict[str, Any] | None = None
    seconds: float = 0.0  # wall time of the row, to size later runs


def packed_vs_padded(
    model: LlamaForCausalLM, exact_model: LlamaForCausalLM, batch: PairBatch, packed: Kernels, padded: Kernels
) -> tuple[Row, float]:
    """Row 1. The tolerance is measured, not guessed: FLOOR_FACTOR x the largest error of the padded path in
    the run dtype against the same weights in float64 (bf16's own rounding on this model and these lengths).
    Returns the row and that tolerance, which rows 2 and 3 reuse."""
    row = Row("packed_vs_padded", f"1 packed ({packed.attn_implementation}) vs padded (sdpa) logps")
    a = logps(model, batch, padded).logps.double().cpu()
    b = logps(model, batch, packed).logps.double().cpu()
    exact = logps(exact_model, batch, padded).logps.double().cpu()
    floor = float((a - exact).abs().max())
    # float32 has its own floor: the log-prob sums run in float32 in every path
    tol = max(FLOOR_FACTOR * floor, 4 * torch.finfo(torch.float32).eps * float(exact.abs().max()))
    diff = (b - a).abs()
    row.data = {
        "max_abs_diff": float(diff.max()),
        "tolerance": tol,
        "dtype_vs_float64": floor,
        "max_abs_logps": float(exact.abs().max()),
        "max_rel_diff": float((diff / exact.abs().clamp(min=1)).max()),
        "sequences": batch.input_ids.size(0),
        "tokens": batch.num_tokens,
        "longest": int(batch.attention_mask.sum(dim=1).max()),
        "attn_packed": packed.attn_implementation,
        "attn_padded": padded.attn_implementation,
        "packed_logps": b.tolist(),
        "padded_logps": a.tolist(),
        "float64_logps": exact.tolist(),
    }
    row.status = "PASS" if float(diff.max()) <= tol else "FAIL"
    row.result = f"max|Δ| {diff.max():.3g} nats (|logps| ≤ {exact.abs().max():.4g})"
    row.bound = f"≤ {tol:.3g} = {FLOOR_FACTOR:g} × padded-vs-float64 {floor:.3g}"
    return row, tol


def ln2_at_step_one(
    model: LlamaForCausalLM, batch: PairBatch, packed: Kernels, settings: SigmoidDPO, logp_tol: float
) -> Row:
    """Row 2. With |policy − reference| ≤ t per sequence, |loss − ln 2| ≤ (β/2)·|Δ| ≤ β·t and |reward| ≤ β·t;
    the same function on the same weights should in fact give exactly ln 2 and 0."""
    row = Row("ln2_step1", "2 step-1 sigmoid loss = ln 2, rewards 0")
    ref = logps(model, batch, packed).logps.detach()  # under no_grad, as stage 2 scores
    policy = logps(model, batch, packed, grad=True)
    out = dpo_loss(settings, preference_inputs(policy, ref))
    out.loss.backward()
    grads = [p.grad.float().norm() for p in model.parameters() if p.grad is not None]
    grad_norm = float(torch.stack(grads).norm()) if grads else float("nan")
    model.zero_grad(set_to_none=True)
    loss = float(out.loss.detach())
    reward = float(torch.cat([out.chosen_rewards, out.rejected_rewards]).abs().max())
    tol = settings.beta * logp_tol
    row.data = {
        "loss": loss,
        "loss_minus_ln2": loss - math.log(2),
        "max_abs_reward": reward,
        "tolerance": tol,
        "beta": settings.beta,
        "grad_norm": grad_norm,
        "policy_vs_ref_max_abs": float((policy.logps.detach() - ref).abs().max()),
    }
    ok = abs(loss - math.log(2)) <= tol and reward <= tol and math.isfinite(grad_norm) and grad_norm > 0
    row.status = "PASS" if ok else "FAIL"
    row.result = f"loss−ln2 {loss - math.log(2):.3g}, max|reward| {reward:.3g}, grad norm {grad_norm:.3g}"
    row.bound = f"≤ β·t = {tol:.3g}; grad finite, > 0"
    return row


def ensure_liger(wheels: Path, device: torch.device) -> str | None:
    """Make liger_kernel importable; None when it is, else why not. A missing package is installed from the
    local wheel into a temporary folder put on sys.path, so the machine's environment is left alone."""
    if device.type != "cuda":
        return "Liger's kernels are Triton: needs CUDA"
    if liger_available():
        return None
    wheel = sorted(wheels.glob("liger_kernel-*.whl"))
    if not wheel:
        return f"liger_kernel not importable and no liger_kernel-*.whl in {wheels}"
    target = Path(tempfile.mkdtemp(prefix="gpu_check_liger_"))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--find-links", str(wheels)]
    pip = subprocess.run([*cmd, "--target", str(target), "liger-kernel"], capture_output=True, text=True)
    if pip.returncode != 0:  # no pip here: a pure-Python wheel is a zip of the package, so unpack it
        print(f"[gpu_check] pip failed ({pip.stderr.strip().splitlines()[-1:]}); unpacking {wheel[-1].name}")
        with zipfile.ZipFile(wheel[-1]) as z:
            z.extractall(target)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    print(f"[gpu_check] installed {wheel[-1].name} into {target}", flush=True)
    return None if liger_available() else f"installed {wheel[-1].name} into {target} but cannot import it"


def liger_vs_plain(model: LlamaForCausalLM, batch: PairBatch, plain_logps: list[float], logp_tol: float) -> Row:
    """Row 3. Run last among the numerics: Liger patches transformers' Llama module globally (RoPE), so the
    plain log-probs are row 1's, taken before the patch; the patched model is a copy."""
    row = Row("liger_vs_plain", "3 Liger-patched vs plain logps (packed)")
    kernels = kernels_for(KernelRequest(use_liger_kernel=True), cuda=True, dtype="bfloat16")
    patched_model = copy.deepcopy(model)
    apply_liger(patched_model, kernels)
    patched = logps(patched_model, batch, kernels).logps.double().cpu()
    plain = torch.tensor(plain_logps, dtype=torch.float64)
    diff = float((patched - plain).abs().max())
    row.data = {"max_abs_diff": diff, "tolerance": logp_tol, "liger_logps": patched.tolist()}
    row.status = "PASS" if diff <= logp_tol else "FAIL"
    row.result = f"max|Δ| {diff:.3g} nats"
    row.bound = f"≤ {logp_tol:.3g} (row 1's)"
    return row


# --- row 4: throughput, MFU and peak memory of one train micro-step ---


def model_flops(model: LlamaForCausalLM, batch: PairBatch) -> tuple[float, float]:
    """(our count, 6·N·D): FLOPs of one forward + backward over the real tokens of `batch` (module docstring)."""
    config = model.config
    body_matmul = sum(m.weight.numel() for m in model.model.modules() if isinstance(m, torch.nn.Linear))
    lengths = batch.attention_mask.sum(dim=1).double()
    tokens = float(lengths.sum())
    scored = float(batch.completion_mask[:, 1:].sum())
    width = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    attention = 6 * config.num_hidden_layers * width * float((lengths**2).sum())
    ours = 6 * body_matmul * tokens + 6 * config.hidden_size * config.vocab_size * scored + attention
    return ours, 6 * sum(p.numel() for p in model.parameters()) * tokens


def time_train_step(
    name: str,
    model: LlamaForCausalLM,
    batch: PairBatch,
    kernels: Kernels,
    settings: SigmoidDPO,
    warmup: int,
    steps: int,
    peak_tflops: float,
    offload: bool = False,
) -> Row:
    """Row 4: `warmup` untimed steps, then `steps` timed ones, each ended by a device sync; the median counts.
    offload: the forward's saved tensors wait for backward in pinned host memory (row 7; CUDA only: on the CPU of
    --smoke they are in host memory already, and pinning needs CUDA)."""
    row = Row(f"speed_{name}", f"4 train step {name}")
    cuda = next(model.parameters()).device.type == "cuda"
    ref = logps(model, batch, kernels).logps.detach()  # DPO's step 1: the reference is the policy
    model.train()  # dropout is 0 in these configs, as the trainer sets it

    def step() -> None:  # the attention was set by `logps` above; the timed loop calls the library directly
        with torch.autograd.graph.save_on_cpu(pin_memory=True) if offload and cuda else contextlib.nullcontext():
            policy = sequence_forward(model, batch, padding_free=kernels.padding_free)
        dpo_loss(settings, preference_inputs(policy, ref)).loss.backward()
        model.zero_grad(set_to_none=True)  # what the optimizer step would do; no AdamW state is needed here

    sync: Callable[[], None] = torch.cuda.synchronize if cuda else lambda: None
    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # weights are counted (still allocated), warm-up spikes are not
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]  # median: one slow step (a GC, a clock change) does not count
    flops, flops_6nd = model_flops(model, batch)
    tokens = batch.num_tokens
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    row.data = {
        "shape": name,
        "params": sum(p.numel() for p in model.parameters()),
        "padding_free": kernels.padding_free,
        "offloaded": offload and cuda,
        "attn_implementation": kernels.attn_implementation,
        "liger": kernels.liger,
        "pairs": batch.num_pairs,
        "tokens_per_step": tokens,
        "padded_tokens_per_step": batch.attention_mask.numel(),
        "scored_tokens_per_step": int(batch.completion_mask[:, 1:].sum()),
        "step_s_median": seconds,
        "step_s_all": times,
        "tokens_per_s": tokens / seconds,
        "model_flops_per_step": flops,
        "flops_6nd_per_step": flops_6nd,
        "tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / (peak_tflops * 1e12),
        "mfu_6nd": flops_6nd / seconds / (peak_tflops * 1e12),
        "peak_mem_gib": peak_gib,
    }
    row.status = "INFO"
    row.result = (
        f"{tokens / seconds:,.0f} tok/s, {flops / seconds / 1e12:.3g} TFLOP/s, MFU {row.data['mfu']:.2%}, "
        f"{seconds * 1e3:.1f} ms/step" + (f", peak {peak_gib:.1f} GiB" if peak_gib is not None else "")
    )
    row.bound = f"{tokens:,} tokens, {batch.num_pairs} pairs"
    return row


def timed_model(
    shape: Shape,
    kernels: Kernels,
    device: torch.device,
    dtype: torch.dtype,
    args: argparse.Namespace,
    smoke: bool,
    long: bool = False,
    offload: bool = False,
) -> Callable[[], Row]:
    """Row 4 for one shape and kernel choice, on a fresh model freed afterwards; with `long`, row 6: one long pair,
    gradient checkpointing on, one warm-up and two timed steps; with `offload` too, row 7."""
    name = f"{shape.name} {'packed' if kernels.padding_free else 'padded'}{'+Liger' if kernels.liger else ''}"
    pairs = (LONG_PAIR_SMOKE if smoke else LONG_PAIR) if long else (SPEED_PAIRS_SMOKE if smoke else SPEED_PAIRS)
    if long:
        name += f" 1 pair of {sum(pairs.prompt) + sum(pairs.completion)} tokens"
    warmup = 1 if long else args.warmup if args.warmup is not None else (1 if smoke else 3)
    steps = 2 if long else args.steps if args.steps is not None else (2 if smoke else 10)

    def run() -> Row:
        model = build_model(shape, device, dtype, seed=2)
        apply_liger(model, kernels)  # a no-op unless kernels.liger
        if long:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        batch = random_pairs(pairs, shape.vocab, seed=3)
        try:
            row = time_train_step(name, model, batch, kernels, SigmoidDPO(), warmup, steps, args.peak_tflops, offload)
            if long:
                row.key = "long_context_offloaded" if offload else "long_context"
                row.check = f"{'7' if offload else '6'} long context {name}{', offloaded' if offload else ''}"
            return row
        finally:
            del model
            release_memory()

    run.__name__ = name
    return run


# --- report ---


def run_row(rows: list[Row], key: str, check: str, fn: Callable[[], Row]) -> Row:
    """Run one row; an exception becomes an ERROR row (traceback on stderr) so the other rows still run."""
    start = time.perf_counter()
    try:
        row = fn()
    except Exception as e:
        traceback.print_exc()
        row = Row(key, check, "ERROR", f"{type(e).__name__}: {e}"[:200])
    row.seconds = time.perf_counter() - start
    rows.append(row)
    print(f"[gpu_check] {row.check}: {row.status} {row.result} ({row.seconds:.1f} s)", flush=True)
    return row


def print_table(rows: list[Row]) -> None:
    headers = ("check", "status", "result", "bound / batch")
    cells = [(r.check, r.status, r.result, r.bound) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    print("-+-".join("-" * w for w in widths))
    for c in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- main ---


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.smoke:
        print("gpu_check: no CUDA device; this check needs one (--smoke runs the CPU self-test)", file=sys.stderr)
        return 2

    # --- setup: dtype, shapes, the kernels the trainer would choose ---
    started = time.perf_counter()
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU runs only as --smoke, whose point is float32
    dtype_name = str(dtype).removeprefix("torch.")
    check_shape = TINY if args.smoke else SMOLLM2_135M
    small, large = (TINY, TINY_WIDE) if args.smoke else (SMOLLM2_135M, LLAMA_1B)
    packed = kernels_for(KernelRequest(), cuda=cuda, dtype=dtype_name)  # the trainer's default choice
    padded = kernels_for(KernelRequest(attn_implementation="sdpa", padding_free=False), cuda=cuda, dtype=dtype_name)
    device_name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    print(
        f"[gpu_check] {device_name}, {dtype_name}, torch {torch.__version__}, transformers {transformers.__version__}"
        f"{', smoke (tiny models)' if args.smoke else ''}\n"
        f"[gpu_check] packed: {packed.describe()}; padded: {padded.describe()}",
        flush=True,
    )
    rows: list[Row] = []

    # --- rows 1 and 2: one random model of the check shape, in the run dtype and in float64 ---
    model = build_model(check_shape, device, torch.float32, seed=0)
    exact = to_dtype(copy.deepcopy(model), torch.float64).eval()
    model = to_dtype(model, dtype).eval()
    batch = random_pairs(CHECK_PAIRS_SMOKE if args.smoke else CHECK_PAIRS, check_shape.vocab, seed=1)
    found: dict[str, float] = {}

    def row1() -> Row:
        row, found["logp_tol"] = packed_vs_padded(model, exact, batch, packed, padded)
        return row

    first = run_row(rows, "packed_vs_padded", "1 packed vs padded logps", row1)
    logp_tol = found.get("logp_tol", math.nan)  # NaN when row 1 failed: rows 2 and 3 then fail too
    run_row(
        rows, "ln2_step1", "2 step-1 loss = ln 2", lambda: ln2_at_step_one(model, batch, packed, SigmoidDPO(), logp_tol)
    )

    # --- row 4 before row 3: Liger patches transformers' Llama module for the whole process ---
    for shape, kernels in ((small, packed), (small, padded), (large, packed)):
        run = timed_model(shape, kernels, device, dtype, args, args.smoke)
        run_row(rows, f"speed_{run.__name__}", f"4 train step {run.__name__}", run)

    # --- row 3, then the 135M timing again with Liger ---
    why_not = ensure_liger(Path(args.wheels), device)
    if why_not is None and first.data is None:
        why_not = "row 1 did not run"
    if why_not is not None:
        rows.append(Row("liger_vs_plain", "3 Liger-patched vs plain logps", "SKIP", f"skipped: {why_not}"))
        print(f"[gpu_check] 3 Liger: skipped: {why_not}", flush=True)
    else:
        plain = first.data["packed_logps"] if first.data else []
        run_row(rows, "liger_vs_plain", "3 Liger vs plain", lambda: liger_vs_plain(model, batch, plain, logp_tol))
        run = timed_model(small, replace(packed, liger=True), device, dtype, args, args.smoke)
        run_row(rows, f"speed_{run.__name__}", f"4 train step {run.__name__}", run)

    # --- row 6: one long pair on the 1B shape, as sequence_parallel_size 1 trains it on one GPU ---
    run = timed_model(large, packed, device, dtype, args, args.smoke, long=True)
    run_row(rows, "long_context", f"6 long context {run.__name__}", run)
    run = timed_model(large, packed, device, dtype, args, args.smoke, long=True, offload=True)
    run_row(rows, "long_context_offloaded", f"7 long context {run.__name__}, offloaded", run)

    # --- row 5: the GPU machine has no Ray or DeepSpeed, and the core and forward must never need a stage ---
    imported = [m for m in FORBIDDEN_MODULES if m in sys.modules]
    result = f"imported: {', '.join(imported)}" if imported else "none in sys.modules"
    check = "5 no ray/deepspeed/pipeline.config/stages import"
    rows.append(Row("no_forbidden_imports", check, "FAIL" if imported else "PASS", result))
    rows[-1].data = {"imported": imported}

    # --- report: one table, one JSON ---
    rows.sort(key=lambda r: r.check[0])  # by row number; stable, so row 4's timings keep their order
    print()
    print_table(rows)
    ok = all(r.status in ("PASS", "SKIP", "INFO") for r in rows)
    results = {
        "ok": ok,
        "smoke": args.smoke,
        "device": device_name,
        "dtype": dtype_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "peak_tflops": args.peak_tflops,
        "kernels_packed": asdict(packed),
        "kernels_padded": asdict(padded),
        "wall_s": time.perf_counter() - started,
        "rows": {
            r.key: {
                "check": r.check,
                "status": r.status,
                "result": r.result,
                "bound": r.bound,
                "seconds": r.seconds,
                **(r.data or {}),
            }
            for r in rows
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n[gpu_check] {'all rows pass' if ok else 'SOME ROWS FAILED'} in {results['wall_s']:.0f} s; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
