"""Which attention and fused kernels a model runs with, chosen once per process and logged.

    kernels = choose_kernels(cfg.model, cuda=torch.cuda.is_available(), dtype=cfg.compute_dtype)
    model = load_causal_lm(path, dtype, attn_implementation=kernels.attn_implementation)
    apply_liger(model, kernels)

Padding-free batches are one row of packed sequences (`pipeline.core.packing.pack`) with `position_ids` restarting
per sequence and the sequence boundaries as `cu_seq_lens_q/k` (transformers' flash-attention varlen kwargs,
passed through the model to every attention call). On CUDA with flash-attn installed they go to
flash-attention-2's varlen kernel. Elsewhere they go to `varlen_sdpa_forward`: causal SDPA run on each
sequence alone, which is exactly what a padded batch computes for its real tokens, without padding and
without a (T, T) block-diagonal mask whose cost would grow with the square of the whole micro-batch.
"""

from __future__ import annotations

import importlib.util
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from pipeline.config import ModelConfig

VARLEN_SDPA = "dpo_varlen_sdpa"  # our registered attention implementation for packed rows off CUDA


@dataclass(frozen=True)
class Kernels:
    attn_implementation: str  # what `from_pretrained(attn_implementation=...)` gets
    padding_free: bool
    liger: bool

    def describe(self) -> str:
        attention = {VARLEN_SDPA: "per-sequence SDPA (packed)", "flash_attention_2": "flash-attention-2"}.get(
            self.attn_implementation, self.attn_implementation
        )
        layout = "padding-free packed rows" if self.padding_free else "right-padded rows"
        return f"{layout}, attention {attention}, Liger kernels {'on' if self.liger else 'off'}"


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def choose_kernels(model_cfg: ModelConfig, cuda: bool, dtype: str) -> Kernels:
    """Resolve `attn_implementation` ("auto") and `use_liger_kernel` (null = auto) for this machine.

    auto picks flash-attention-2 on CUDA with flash-attn installed and a 16-bit dtype (its kernels have no
    float32), else SDPA; Liger when CUDA and liger-kernel are present. An explicit choice that this machine
    cannot run is an error here, before any model loads.
    """
    from pipeline.errors import ConfigError

    impl: str = model_cfg.attn_implementation
    if impl == "auto":
        impl = "flash_attention_2" if cuda and flash_attn_available() and dtype != "float32" else "sdpa"
    elif impl == "flash_attention_2" and not (cuda and flash_attn_available()):
        raise ConfigError(
            "attn_implementation=flash_attention_2 needs CUDA and the flash-attn package "
            "(pip install 'dpo-pipeline[gpu]'); use auto or sdpa here."
        )
    if impl == "sdpa" and model_cfg.padding_free:
        impl = VARLEN_SDPA
    liger = model_cfg.use_liger_kernel
    if liger is None:
        liger = cuda and liger_available()
    elif liger and not (cuda and liger_available()):
        raise ConfigError(
            "use_liger_kernel=true needs CUDA and the liger-kernel package "
            "(pip install 'dpo-pipeline[gpu]'); leave it unset (auto) or false here."
        )
    if impl == VARLEN_SDPA:
        register_varlen_sdpa()
    return Kernels(impl, model_cfg.padding_free, liger)


def apply_liger(model: torch.nn.Module, kernels: Kernels) -> None:
    """Swap RMSNorm, SwiGLU and RoPE for Liger's Triton kernels. The LM head is left alone: our chunked
    log-prob function never builds the logits that Liger's fused cross-entropy would save."""
    if not kernels.liger:
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )


def register_varlen_sdpa() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_forward)


def varlen_sdpa_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: Tensor | None = None,
    position_ids: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Causal attention within each packed sequence: query (1, heads, T, d), key/value (1, kv_heads, T, d), the
    sequence boundaries `cu_seq_lens_q` (S+1,), else where `position_ids` (1, T) restart at 0 (how a
    sequence-parallel group passes a packed row's whole layout, see `pipeline.models.sequence_parallel`).
    Returns (1, T, heads, d) like transformers' SDPA."""
    if cu_seq_lens_q is not None:
        bounds = cu_seq_lens_q.tolist()
    elif position_ids is not None and query.size(0) == 1 and position_ids.shape == (1, query.size(2)):
        starts = (position_ids[0] == 0).nonzero().flatten().tolist()
        bounds = [*starts, query.size(2)] if starts and starts[0] == 0 else []
    else:
        bounds = []
    if not bounds:
        raise RuntimeError(
            f"{VARLEN_SDPA} runs packed rows only: call pipeline.models.forward.sequence_forward with a "
            "padding-free batch (neither cu_seq_lens_q nor positions that start at 0)"
        )
    if attention_mask is not None:
        raise RuntimeError(f"{VARLEN_SDPA} got an attention mask; packed rows need none")
    gqa = query.size(1) != key.size(1)
    parts = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e],
            key[:, :, s:e],
            value[:, :, s:e],
            dropout_p=dropout,
            scale=scaling,
            is_causal=True,
            enable_gqa=gqa,
        )
        for s, e in itertools.pairwise(bounds)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None
