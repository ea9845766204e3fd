"""The policy and its DeepSpeed engine: building them (partitioned from the start under ZeRO-3), measuring them."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.models.deepspeed_import import import_deepspeed
from pipeline.models.kernels import Kernels
from pipeline.models.loading import build_model
from pipeline.models.sequence_parallel import SequenceGroup, enable_ulysses, sequence_group
from pipeline.models.tiling import tile_mlps
from pipeline.train.collectives import agree_max
from pipeline.train.optim import decay_groups, deepspeed_config, lr_lambda, warmup_steps

SHM_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU shared-memory all-reduce (ShareMemCommBuilder.NAME)


def init_deepspeed_comm(**kwargs: Any) -> None:
    """`deepspeed.init_distributed(**kwargs)`; on a machine without CUDA, without DeepSpeed's shared-memory
    all-reduce op. DeepSpeed compiles that op with the machine's C++ compiler when its communicator is made (about a
    minute of CPU, again for each new environment), for the all-reduce of inference tensor parallelism alone
    (`inference_all_reduce`), which training never calls; ZeRO's collectives are torch.distributed's either way."""
    deepspeed = import_deepspeed()
    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False  # read by deepspeed.comm.torch.build_shm_op
    deepspeed.init_distributed(**kwargs)


@contextlib.contextmanager
def sharded_building(cfg: Config, world_size: int) -> Iterator[None]:
    """Under ZeRO-3, models built inside this block are partitioned from the start: while a `HfDeepSpeedConfig`
    lives, transformers' `from_pretrained` creates the model under `deepspeed.zero.Init` (each rank allocates only
    its partition of every weight) and copies the checkpoint in one module at a time (rank 0 reads the
    memory-mapped files, the module's weights are gathered for that copy and partitioned again). Build the
    engine inside the block too. Other stages: nothing changes. zero.Init reads the world size from DeepSpeed's
    communicator: make it first (`init_deepspeed_comm`)."""
    if cfg.scale.zero_stage != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    live = HfDeepSpeedConfig(deepspeed_config(cfg, world_size))  # transformers holds only a weak reference
    try:
        yield
    finally:
        del live


def build_training(
    cfg: Config, model_dir: str, world_size: int, total: int
) -> tuple[Any, Kernels, SequenceGroup | None]:
    """The DeepSpeed engine around the policy (built partitioned under ZeRO-3) and this rank's sequence-parallel
    group, None when sequence_parallel_size is 1, with the model's attention routed through it."""
    k = cfg.scale.sequence_parallel_size
    group = sequence_group(k) if k > 1 else None  # every rank makes every group, before the engine makes its own
    # DeepSpeed's communicator around the process group Ray Train made, for zero.Init and deepspeed.initialize
    init_deepspeed_comm(dist_init_required=False)
    with sharded_building(cfg, world_size):
        policy, kernels = build_policy(cfg, model_dir)
        engine = build_engine(cfg, policy, world_size, total)
    if group is not None:
        enable_ulysses(policy.config, kernels.attn_implementation, group)
    return engine, kernels, group


def build_policy(cfg: Config, model_dir: str) -> tuple[torch.nn.Module, Kernels]:
    """The trainable policy (`build_model`, then gradient checkpointing and LoRA as configured), in train mode.
    Call it inside `sharded_building`."""
    model, kernels = build_model(cfg.model, model_dir, cfg.compute_dtype, cfg.scale.use_gpu)
    if cfg.model.tiled_mlp:  # under ZeRO-3 each tile gathers the MLP's weights: every rank runs as many tiles
        device = torch.device("cuda" if cfg.scale.use_gpu else "cpu")
        zero3 = cfg.scale.zero_stage == 3
        tile_mlps(model, agree=(lambda n: agree_max(n, device)) if zero3 else (lambda n: n))
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
        torch.manual_seed(cfg.train.seed)  # the adapter's initialisation, whatever loading drew before
        policy: torch.nn.Module = get_peft_model(model, lora)
    else:
        policy = model
    policy.train()
    return policy, kernels


def build_engine(cfg: Config, model: torch.nn.Module, world_size: int, total: int) -> Any:
    deepspeed = import_deepspeed()
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
