"""One micro-batch of training or evaluation: ONE forward of 2B sequences, the combined loss, the metric row."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline import schema
from pipeline.config import Config
from pipeline.core.logprobs import SequenceStats, ld_logps
from pipeline.core.losses import PreferenceInputs, dpo_loss
from pipeline.core.metrics import batch_metric_sums, finalize
from pipeline.core.packing import PairBatch
from pipeline.data.pairs import PairTable
from pipeline.models.forward import collate_pairs, sequence_forward
from pipeline.models.sequence_parallel import SequenceGroup
from pipeline.train.collectives import agree_max, all_reduce_rows

REF_COLUMNS = (
    schema.REF_CHOSEN_SHARED_LOGPS,
    schema.REF_CHOSEN_TAIL_LOGPS,
    schema.REF_REJECTED_SHARED_LOGPS,
    schema.REF_REJECTED_TAIL_LOGPS,
)


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
    weight: float = 1.0,
    loss_scale: float = 1.0,
    group: SequenceGroup | None = None,
) -> MicroResult:
    """ONE forward of 2B sequences, then the combined loss times `loss_scale` (the micro-batch's share of the
    step's pairs, `Schedule.loss_scale`); `weight` 0 marks a filler batch (eval). With a sequence-parallel
    `group` every rank of it passes the same pairs and returns the same loss."""
    rows = pairs.rows(idx)
    batch = collate_pairs(rows, pad_id)
    with saved_for_backward_in_host_memory(cfg.model.activation_offloading and engine.device.type == "cuda"):
        stats = sequence_forward(
            engine,
            batch,
            with_metrics=True,
            agree_calls=lambda calls: agree_max(calls, engine.device),  # ZeRO-3 gathers the head's weights per call
            padding_free=cfg.model.padding_free,
            group=group,
        )
    x = preference_inputs(cfg, stats, rows, batch)
    out = dpo_loss(cfg.loss, x)
    row = batch_metric_sums(out, stats, input_tokens=batch.num_tokens, loss_scale=loss_scale)
    if group is not None and group.rank != 0:
        weight = 0.0  # every rank of a group has the group's row: count it once
    return MicroResult(out.loss * loss_scale, row * weight)


def saved_for_backward_in_host_memory(on: bool) -> contextlib.AbstractContextManager[Any]:
    """activation_offloading: every tensor the forward saves for backward waits in pinned host memory and is
    copied back when backward needs it. Under gradient checkpointing those are each layer's input (checkpoint
    saves them through autograd, outside its own hooks) and the LM-head chunks' inputs; a layer's inner
    activations are recomputed on the GPU in backward as before."""
    return torch.autograd.graph.save_on_cpu(pin_memory=True) if on else contextlib.nullcontext()


def preference_inputs(
    cfg: Config, stats: SequenceStats, rows: dict[str, list[Any]], batch: PairBatch
) -> PreferenceInputs:
    """The loss inputs of one micro-batch; the reference's come from the table's cached columns, and are None
    when the run needs no reference (its table has none)."""
    b = batch.num_pairs
    alpha = cfg.loss.ld_alpha
    policy = ld_logps(stats.shared_logps, stats.tail_logps, alpha)
    ref_chosen = ref_rejected = None
    if cfg.loss.needs_reference:
        ref = {k: torch.tensor(rows[k], dtype=stats.logps.dtype, device=stats.logps.device) for k in REF_COLUMNS}
        ref_chosen = ld_logps(ref[schema.REF_CHOSEN_SHARED_LOGPS], ref[schema.REF_CHOSEN_TAIL_LOGPS], alpha)
        ref_rejected = ld_logps(ref[schema.REF_REJECTED_SHARED_LOGPS], ref[schema.REF_REJECTED_TAIL_LOGPS], alpha)
    return PreferenceInputs(
        policy_chosen_logps=policy[:b],
        policy_rejected_logps=policy[b:],
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        chosen_tokens=stats.tokens[:b],
        rejected_tokens=stats.tokens[b:],
        policy_chosen_full_logps=stats.logps[:b],
        wpo_chosen_logps=stats.wpo_logps[:b] if stats.wpo_logps is not None else None,
        wpo_rejected_logps=stats.wpo_logps[b:] if stats.wpo_logps is not None else None,
    )


def eval_metrics(rows: list[torch.Tensor]) -> dict[str, float]:
    """Exact dataset-level eval metrics: sums over every eval pair, then one ratio each."""
    return finalize(torch.stack(rows).sum(dim=0))


class Evaluator:
    """Held-out metrics over every eval pair, exact (sums over pairs, then ratios), with any number of ranks.

    Each rank's eval batches are cut once. A rank with fewer batches than another runs filler batches of
    weight 0, so every rank makes the same collectives; weighting each batch's mean loss by its share of the
    pairs makes the eval loss the exact mean over pairs.
    """

    def __init__(
        self, cfg: Config, pairs: PairTable, rank: int, world: int, pad_id: int, group: SequenceGroup | None = None
    ):
        """rank, world: this rank's data-parallel rank and their number (a sequence-parallel group counts once)."""
        self.cfg, self.pairs, self.rank, self.pad_id, self.group = cfg, pairs, rank, pad_id, group
        plan = [pairs.eval_batches(cfg, r, world) for r in range(world)]
        self.batches = plan[rank]
        self.real_batches = sum(len(b) > 0 for batches in plan for b in batches)

    def __call__(self, engine: Any) -> dict[str, float]:
        engine.eval()
        rows = []
        with torch.no_grad():
            for idx in self.batches:
                filler = len(idx) == 0
                result = micro_step(
                    self.cfg,
                    engine,
                    self.pairs,
                    np.zeros(1, dtype=np.int64) if filler else idx,
                    self.pad_id,
                    weight=0.0 if filler else 1.0,
                    loss_scale=len(idx) * self.real_batches / len(self.pairs),
                    group=self.group,
                )
                rows.append(result.metric_row)
        engine.train()
        return eval_metrics([all_reduce_rows(rows, engine.device).sum(dim=0)])
