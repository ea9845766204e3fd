"""Sequence parallelism: k ranks share every sequence of a micro-batch, each holding 1/k of its positions.

    group = sequence_group(k)                                  # every rank, once, after the process group exists
    enable_ulysses(model.config, kernels.attn_implementation, group)
    stats = sequence_forward(model, batch, group=group)        # the whole group's sums on every rank

Every rank of a group reads the same micro-batch and runs the model body on its own window of positions
(`split_padded`, `split_packed`). Inside attention, DeepSpeed's Ulysses all-to-all (`UlyssesSPAttentionHF`,
arXiv:2309.14509 and ALST arXiv:2506.13996) trades the sequence split for a head split: each rank attends
over the whole sequence for 1/k of the heads, then trades back. Causality comes from the positions, not
from a mask: right-padded rows need none (padding comes after every real token), and packed rows are kept
apart by positions restarting at 0, which the varlen attention reads (`pipeline.models.kernels`).

The per-sequence sums of a rank's positions (`pipeline.core.logprobs.sequence_stats` with `hidden_index`) are
summed over the group with a differentiable all-reduce, so every rank computes the loss of the whole
sequences. Its backward sums the k ranks' identical upstream gradients, so each rank's weight gradients are k
times its share; DeepSpeed's mean over all k·D ranks then gives the mean over the D data-parallel groups,
which is what a run of D unsplit workers computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.core.logprobs import SequenceStats
from pipeline.core.packing import PackedRow, PairBatch
from pipeline.errors import ConfigError
from pipeline.models.deepspeed_import import import_deepspeed


@dataclass(frozen=True)
class SequenceGroup:
    """This rank's sequence-parallel group: `size` ranks in a row of the world, this one `rank` among them."""

    size: int
    rank: int
    group: Any  # torch.distributed.ProcessGroup

    def window(self, length: int) -> tuple[int, int]:
        """(start, local length) of this rank's positions once `length` is padded to a multiple of the size."""
        local = math.ceil(length / self.size)
        return self.rank * local, local

    def reduce(self, stats: SequenceStats) -> SequenceStats:
        """Every per-sequence sum over the whole group; log-prob sums keep their gradient."""
        out = {}
        for f in fields(stats):
            value = getattr(stats, f.name)
            if value is not None:
                out[f.name] = _summed(value, self.group)
        return replace(stats, **out)


def _summed(t: Tensor, group: Any) -> Tensor:
    if t.requires_grad:
        return _GroupSum.apply(t, group)  # type: ignore[no-any-return]
    t = t.detach().clone()
    dist.all_reduce(t, group=group)
    return t


class _GroupSum(torch.autograd.Function):
    """y = Σ_ranks x; its gradient on every rank is Σ_ranks ∂L/∂y (each rank's loss counts)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sequence_group(size: int) -> SequenceGroup:
    """The world cut into groups of `size` consecutive ranks (data parallelism runs across groups). Every rank
    must call this, in the same order as its other collectives: each group is made by all ranks."""
    world, me = dist.get_world_size(), dist.get_rank()
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= me < first + size:
            mine = group
    return SequenceGroup(size, me % size, mine)


def check_model(model: str, size: int, trust_remote_code: bool = False) -> None:
    """`check_heads` on a model's config file (the driver's check, before any worker starts)."""
    if size > 1:
        from transformers import AutoConfig

        check_heads(AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code), size)


def _attention_config(model_config: Any) -> tuple[Any, int, int]:
    """(the text model's config, its attention heads, its key/value heads)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = text.num_attention_heads
    return text, heads, getattr(text, "num_key_value_heads", None) or heads


def check_heads(model_config: Any, size: int) -> None:
    """Refuse a model whose attention heads the Ulysses all-to-all cannot split over `size` ranks."""
    _, heads, kv = _attention_config(model_config)
    if heads % size:
        raise ConfigError(
            f"sequence_parallel_size={size} is not allowed for this model: its {heads} attention heads do not "
            f"divide into {size} groups (each rank attends with heads / sequence_parallel_size of them); use a "
            f"divisor of {heads}"
        )
    if kv % size and size % kv:
        raise ConfigError(
            f"sequence_parallel_size={size} is not allowed for this model: its {kv} key/value heads neither divide "
            f"into {size} groups nor divide {size} (then each is copied to {size} // {kv} ranks); use a divisor or "
            f"a multiple of {kv}"
        )


def enable_ulysses(model_config: Any, attn_implementation: str, group: SequenceGroup) -> None:
    """Route this process's `attn_implementation` through DeepSpeed's Ulysses all-to-all over `group`.

    Like DeepSpeed's own `register_with_transformers`, the wrapper replaces the implementation's entry in
    transformers' attention table (so the model's other code paths for it still run), drops the local mask
    (causality comes from the gathered positions) and lets each call carry its own batch size."""
    import_deepspeed()
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    check_heads(model_config, group.size)
    text, heads, kv = _attention_config(model_config)

    class AnyBatchUlysses(UlyssesSPAttentionHF):
        """DeepSpeed's module fixes the batch size at construction; micro-batches here vary in size."""

        def forward(self, module: Any, query: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Any]:
            me: Any = self
            b = query.size(0)
            if b != me.batch_size:  # the shapes it checks: [positions, batch, ...], positions reset per call
                me.batch_size = b
                for name in ("required_query_shape", "required_key_value_shape", "required_context_shape"):
                    setattr(me, name, torch.Size([1, b, *getattr(me, name)[2:]]))
            return super().forward(module, query, *args, **kwargs)  # type: ignore[no-any-return]

    ulysses = AnyBatchUlysses(
        attn=ALL_ATTENTION_FUNCTIONS[attn_implementation],
        batch_size=1,
        attn_head_count=heads,
        attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // heads,
        kv_head_count=kv,
        num_hidden_layers=text.num_hidden_layers,
        process_group=group.group,
        seq_length_is_variable=True,
    )

    def attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, *args: Any,
                  **kwargs: Any) -> tuple[Tensor, Any]:  # fmt: skip
        return ulysses(module, query, key, value, None, *args, **kwargs)  # type: ignore[no-any-return]

    ALL_ATTENTION_FUNCTIONS[attn_implementation] = attention


def split_padded(batch: PairBatch, group: SequenceGroup) -> tuple[dict[str, Any], Tensor]:
    """This rank's window of the right-padded rows: the body's inputs (ids and their global positions; no mask)
    and the (2B, T) index of each position's hidden state in the body's output flattened to (2B·L, H)."""
    n, width = batch.input_ids.shape
    start, local = group.window(width)
    ids = torch.nn.functional.pad(batch.input_ids, (0, local * group.size - width))[:, start : start + local]
    positions = torch.arange(start, start + local).expand(n, local)
    t = torch.arange(width)
    held = (t >= start) & (t < start + local)
    index = torch.where(held, torch.arange(n).unsqueeze(1) * local + t - start, -1)
    return {"input_ids": ids, "position_ids": positions}, index


def split_packed(row: PackedRow, packed_index: Tensor, group: SequenceGroup) -> tuple[dict[str, Any], Tensor]:
    """This rank's window of a packed row, padded at its end by one more sequence of filler tokens (positions
    from 0, so no real sequence attends to it), and the index of each (sequence, position) in its output row."""
    width = row.input_ids.size(1)
    start, local = group.window(width)
    filler = local * group.size - width
    ids = torch.nn.functional.pad(row.input_ids, (0, filler))[:, start : start + local]
    positions = torch.cat([row.position_ids, torch.arange(filler).unsqueeze(0)], dim=1)[:, start : start + local]
    index = packed_index - start
    index = torch.where((packed_index >= 0) & (index >= 0) & (index < local), index, -1)
    return {"input_ids": ids, "position_ids": positions}, index
