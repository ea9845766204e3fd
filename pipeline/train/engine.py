"""The policy and its DeepSpeed engine: building them, measuring them, exporting the trained model."""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.config import Config
from pipeline.models.kernels import Kernels
from pipeline.models.loading import build_model
from pipeline.train.optim import decay_groups, deepspeed_config, lr_lambda, warmup_steps


def build_policy(cfg: Config, model_dir: str) -> tuple[torch.nn.Module, Kernels]:
    """The trainable policy (`build_model`, then gradient checkpointing and LoRA as configured), in train mode."""
    torch.manual_seed(cfg.train.seed)  # LoRA initialisation
    model, kernels = build_model(cfg.model, model_dir, cfg.compute_dtype, cfg.scale.use_gpu)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.use_peft:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.model.lora_r,
            lora_alpha=cfg.model.lora_alpha,
            lora_dropout=cfg.model.lora_dropout,
            target_modules=list(cfg.model.lora_target_modules or []) or None,
            task_type="CAUSAL_LM",
        )
        if cfg.model.gradient_checkpointing:
            model.enable_input_require_grads()
        policy: torch.nn.Module = get_peft_model(model, lora)
    else:
        policy = model
    policy.train()
    return policy, kernels


def build_engine(cfg: Config, model: torch.nn.Module, world_size: int, total: int) -> Any:
    import deepspeed

    ds_config = deepspeed_config(cfg, world_size)
    ds_config["zero_allow_untested_optimizer"] = True
    optimizer = None
    if not cfg.scale.offload_optimizer:
        groups = [g for g in decay_groups(model.named_parameters(), cfg.train.weight_decay) if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    schedule = lr_lambda(cfg.train.lr_scheduler_type, warmup_steps(cfg, total), total)

    def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        dist_init_required=False,
    )
    return engine


def gradient_norm(module: torch.nn.Module) -> float:
    """L2 norm of all gradients, before clipping (what HF Trainer logs as grad_norm); call it after the last
    backward of an optimizer step, when the gradients are already averaged over ranks, and before the step."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return (
        float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        if grads
        else 0.0
    )


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def private_memory_bytes() -> int:
    """This process's anonymous resident memory (RssAnon): its heap, not the page cache of mapped files such
    as the training table, which every worker of a node shares. 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def export_model(cfg: Config, engine: Any, tokenizer: PreTrainedTokenizerBase, out_dir: Path, rank: int) -> None:
    """final/: a standard HF directory (ZeRO-3 parameters gathered); with LoRA the adapter, plus merged/."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.scale.zero_stage == 3 else None
    with gather if gather is not None else contextlib.nullcontext():
        if rank != 0:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        if cfg.model.use_peft:
            merged = module.merge_and_unload()
            merged.save_pretrained(out_dir / "merged", safe_serialization=True)
            tokenizer.save_pretrained(out_dir / "merged")
    os.sync()
