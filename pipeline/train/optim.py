"""Optimizer pieces built from the typed config: AdamW parameter groups, learning-rate schedules and the
DeepSpeed config dict. Pure functions; the schedules follow transformers' (what TRL uses)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from pipeline.config import Config

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def warmup_steps(cfg: Config, total: int) -> int:
    t = cfg.train
    return t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * total)


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at step s (transformers' linear / cosine / constant)."""

    def linear(s: int) -> float:
        if s < warmup:
            return s / max(1, warmup)
        return max(0.0, (total - s) / max(1, total - warmup))

    def cosine(s: int) -> float:
        if s < warmup:
            return s / max(1, warmup)
        progress = (s - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    def constant(s: int) -> float:
        return 1.0

    return {"linear": linear, "cosine": cosine, "constant": constant}[kind]


def decay_groups(named_params: Iterable[tuple[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases and norm weights (transformers' rule)."""
    decay: list[Any] = []
    no_decay: list[Any] = []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(cfg: Config, num_workers: int) -> dict[str, Any]:
    """The DeepSpeed config for this run (optimizer and scheduler are passed as objects, except with
    optimizer offload, where DeepSpeed must own its CPU Adam)."""
    t, s = cfg.train, cfg.scale
    zero: dict[str, Any] = {"stage": s.zero_stage}
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if s.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    if s.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # the export gathers one tensor at a time
        live = s.zero3_max_live_parameters
        zero |= {
            "stage3_max_live_parameters": live,
            "stage3_max_reuse_distance": live,
            "stage3_prefetch_bucket_size": min(live, 50_000_000),  # DeepSpeed's default, within the window
        }
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.per_device_train_batch_size * t.gradient_accumulation_steps * num_workers,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.compute_dtype == "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if s.offload_optimizer:
        out["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": t.learning_rate,
                "betas": list(ADAM_BETAS),
                "eps": ADAM_EPS,
                "weight_decay": t.weight_decay,
            },
        }
    return out
