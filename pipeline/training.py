"""Pieces of the training worker that are not the loop itself: the pair table, the policy and its
DeepSpeed engine, one micro-batch's loss, metric output, and the export of the final model."""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import schema
from pipeline.config import Config
from pipeline.core.batching import Schedule, eval_batches
from pipeline.core.logprobs import SequenceStats, ld_logps, lm_head_calls
from pipeline.core.losses import PreferenceInputs, dpo_loss
from pipeline.core.metrics import batch_metric_sums, finalize
from pipeline.core.packing import PairBatch
from pipeline.forward import collate_pairs, sequence_forward
from pipeline.kernels import Kernels, apply_liger
from pipeline.loggers import ExperimentLogger, tracker_name
from pipeline.optim import decay_groups, deepspeed_config, lr_lambda, warmup_steps

REF_COLUMNS = (
    schema.REF_CHOSEN_SHARED_LOGPS,
    schema.REF_CHOSEN_TAIL_LOGPS,
    schema.REF_REJECTED_SHARED_LOGPS,
    schema.REF_REJECTED_TAIL_LOGPS,
)


# --- data ---


@dataclass(frozen=True)
class PairTable:
    """Tokenized pairs joined with their reference scores, sorted by pair_id (row i = schedule index i)."""

    table: pa.Table

    @classmethod
    def from_batches(cls, batches: list[pa.Table]) -> PairTable:
        table = pa.concat_tables(batches) if batches else pa.table({})
        return cls(table.sort_by(schema.PAIR_ID).combine_chunks())

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, idx: np.ndarray) -> dict[str, list[Any]]:
        return self.table.take(pa.array(idx, type=pa.int64())).to_pydict()

    def lengths(self) -> np.ndarray:
        """(n, 2) chosen and rejected sequence lengths, for token-budget batches."""
        return np.stack(
            [
                pc.list_value_length(self.table[c]).to_numpy()
                for c in (schema.CHOSEN_INPUT_IDS, schema.REJECTED_INPUT_IDS)
            ],
            axis=1,
        )

    def schedule(self, cfg: Config, num_workers: int) -> Schedule:
        t = cfg.train
        budget = t.max_tokens_per_batch
        return Schedule(
            len(self),
            t.seed,
            num_workers,
            t.per_device_train_batch_size,
            t.gradient_accumulation_steps,
            lengths=self.lengths() if budget else None,
            max_tokens=budget,
            padded=not cfg.model.padding_free,
        )

    def eval_batches(self, cfg: Config, rank: int, num_workers: int) -> list[np.ndarray]:
        budget = cfg.train.max_tokens_per_batch
        return eval_batches(
            len(self),
            rank,
            num_workers,
            cfg.train.per_device_eval_batch_size,
            lengths=self.lengths() if budget else None,
            max_tokens=budget,
            padded=not cfg.model.padding_free,
        )


def load_pairs(iterator: Any) -> PairTable:
    """All rows of a Ray Train dataset shard (not split: every rank holds the whole table)."""
    return PairTable.from_batches(list(iterator.iter_batches(batch_size=None, batch_format="pyarrow")))


# --- the policy ---


def build_policy(cfg: Config, model_dir: str, kernels: Kernels) -> torch.nn.Module:
    from pipeline.forward import check_supported
    from pipeline.models import load_causal_lm

    torch.manual_seed(cfg.train.seed)  # LoRA initialisation
    model = load_causal_lm(
        model_dir,
        cfg.compute_dtype,
        cfg.model.trust_remote_code,
        cfg.model.allow_pickle_weights,
        kernels.attn_implementation,
    )
    check_supported(model)
    apply_liger(model, kernels)
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
        model = get_peft_model(model, lora)
    model.train()
    return model


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


# --- one micro-batch ---


@dataclass
class MicroResult:
    loss: torch.Tensor
    metric_row: torch.Tensor


def micro_step(
    cfg: Config,
    engine: Any,
    pairs: PairTable,
    idx: np.ndarray,
    pad_id: int,
    world_size: int,
    weight: float = 1.0,
    loss_scale: float = 1.0,
) -> MicroResult:
    """ONE forward of 2B sequences, then the combined loss times `loss_scale` (the micro-batch's share of the
    step's pairs, `Schedule.loss_scale`); `weight` 0 marks a filler batch (eval)."""
    rows = pairs.rows(idx)
    batch = collate_pairs(rows, pad_id)
    min_chunks = _agree_on_lm_head_calls(batch, world_size)
    stats = sequence_forward(
        engine, batch, with_metrics=True, min_chunks=min_chunks, padding_free=cfg.model.padding_free
    )
    x = preference_inputs(cfg, stats, rows, batch)
    out = dpo_loss(cfg.loss, x)
    row = batch_metric_sums(out, x, stats, input_tokens=batch.num_tokens, loss_scale=loss_scale)
    return MicroResult(out.loss * loss_scale, row * weight)


def preference_inputs(
    cfg: Config, stats: SequenceStats, rows: dict[str, list[Any]], batch: PairBatch
) -> PreferenceInputs:
    b = batch.num_pairs
    device = stats.logps.device
    ref = {k: torch.tensor(rows[k], dtype=stats.logps.dtype, device=device) for k in REF_COLUMNS}
    alpha = cfg.loss.ld_alpha
    policy = ld_logps(stats.shared_logps, stats.tail_logps, alpha)
    return PreferenceInputs(
        policy_chosen_logps=policy[:b],
        policy_rejected_logps=policy[b:],
        ref_chosen_logps=ld_logps(ref[schema.REF_CHOSEN_SHARED_LOGPS], ref[schema.REF_CHOSEN_TAIL_LOGPS], alpha),
        ref_rejected_logps=ld_logps(ref[schema.REF_REJECTED_SHARED_LOGPS], ref[schema.REF_REJECTED_TAIL_LOGPS], alpha),
        chosen_tokens=stats.tokens[:b],
        rejected_tokens=stats.tokens[b:],
        policy_chosen_full_logps=stats.logps[:b],
        wpo_chosen_logps=stats.wpo_logps[:b] if stats.wpo_logps is not None else None,
        wpo_rejected_logps=stats.wpo_logps[b:] if stats.wpo_logps is not None else None,
    )


def _agree_on_lm_head_calls(batch: PairBatch, world_size: int) -> int:
    """Under ZeRO-3 each LM-head call is a collective: every rank makes as many as the busiest one."""
    calls = lm_head_calls(batch.completion_mask)
    if world_size == 1:
        return calls
    t = torch.tensor([calls], dtype=torch.long)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def all_reduce_rows(rows: list[torch.Tensor], world_size: int) -> torch.Tensor:
    """Stack a step's micro-batch metric rows and sum them over ranks: one collective per step."""
    stacked = torch.stack(rows).cpu()
    if world_size > 1:
        torch.distributed.all_reduce(stacked)
    return stacked


# --- output ---


class MetricsLog:
    """metrics.jsonl (one line per logging step, each step once even after a resume), TensorBoard, the
    optional experiment loggers and a console line with progress and ETA. Only rank 0 makes one."""

    def __init__(self, output_dir: str, start_step: int, total_steps: int, loggers: Sequence[ExperimentLogger] = ()):
        self.dir = Path(output_dir).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        kept = []
        if start_step > 0 and self.path.exists():  # drop lines written after the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.loggers = list(loggers)
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.time()

    def write(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        record = {"step": step, **{f"{prefix}{k}": v for k, v in values.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        logged = {k: v for k, v in record.items() if k != "step"}
        for k, v in logged.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(tracker_name(k), v, step)
        self.tb.flush()
        for logger in self.loggers:
            logger.log(logged, step)
        print(self._console(step, values, prefix), flush=True)

    def _console(self, step: int, v: dict[str, float], prefix: str) -> str:
        if prefix:
            return (
                f"[eval] step {step}: loss {v['loss']:.4f} | reward acc {v['rewards/accuracies']:.3f} | "
                f"margin {v['rewards/margins']:.4f}"
            )
        done = step - self.start_step
        rate = done / (time.time() - self.t0) if done else 0.0
        eta = (self.total - step) / rate if rate else float("nan")
        return (
            f"[train] step {step}/{self.total} ({100 * step / self.total:.0f}%) epoch {v['epoch']:.2f} | "
            f"loss {v['loss']:.4f} | reward acc {v['rewards/accuracies']:.3f} | margin "
            f"{v['rewards/margins']:.4f} | {v.get('pairs_per_second', 0.0):.2f} pairs/s | ETA {_eta(eta)}"
        )

    def close(self) -> None:
        self.tb.close()
        for logger in self.loggers:
            logger.close()


def _eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


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


def eval_metrics(rows: list[torch.Tensor]) -> dict[str, float]:
    """Exact dataset-level eval metrics: sums over every eval pair, then one ratio each."""
    return finalize(torch.stack(rows).sum(dim=0))


def export_model(cfg: Config, engine: Any, tokenizer: Any, out_dir: Path, rank: int) -> None:
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
