"""Tokenized pairs -> one batch of 2B sequences -> per-sequence stats; shared by scoring and training.

A micro-batch of B pairs becomes ONE forward of 2B sequences, chosen rows first, then rejected rows
(TRL's DataCollatorForPreference layout), so the reference scorer and the policy see exactly the same
tensors and the same log-prob function. The 2B sequences run either right-padded, or padding-free: packed
into one row with positions restarting per sequence and attention kept inside each (`pipeline.models.kernels`),
and either whole or split along their length over a sequence-parallel group (`pipeline.models.sequence_parallel`).
Every layout gives the same hidden states for every real token, so the log-prob function never knows which ran.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from pipeline import schema
from pipeline.core.logprobs import SequenceStats, lm_head_calls, sequence_stats
from pipeline.core.packing import PairBatch, pack, scored_tokens
from pipeline.models.deepspeed_import import import_deepspeed
from pipeline.models.sequence_parallel import SequenceGroup, split_packed, split_padded


def collate_pairs(columns: Mapping[str, Sequence[Any]], pad_token_id: int) -> PairBatch:
    """Columns of the tokenized schema (lists, numpy or Arrow-converted) -> a PairBatch."""
    chosen = [list(map(int, ids)) for ids in columns[schema.CHOSEN_INPUT_IDS]]
    rejected = [list(map(int, ids)) for ids in columns[schema.REJECTED_INPUT_IDS]]
    starts = [int(s) for s in columns[schema.CHOSEN_COMPLETION_START]] + [
        int(s) for s in columns[schema.REJECTED_COMPLETION_START]
    ]
    sequences = chosen + rejected
    width = max(len(s) for s in sequences)
    n = len(sequences)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, start) in enumerate(zip(sequences, starts)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        completion_mask[i, start : len(ids)] = 1
    counts = [scored_tokens(len(ids), start) for ids, start in zip(sequences, starts)]
    b = len(chosen)
    shared = [min(counts[i], counts[b + i]) for i in range(b)]
    return PairBatch(input_ids, attention_mask, completion_mask, torch.tensor(shared + shared, dtype=torch.long))


def split_lm(model: Any) -> tuple[Any, torch.nn.Module]:
    """(body, lm_head) of a causal LM, a PEFT wrapper or a DeepSpeed engine around one; the body is the base
    transformer module (called for its last hidden state, asked for its input embeddings)."""
    inner = getattr(model, "module", model)  # DeepSpeed engine
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    body = getattr(inner, inner.base_model_prefix)
    return body, inner.get_output_embeddings()


def head_call(head: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """How the chunked log-prob function calls the LM head: the module itself, but a ZeRO-3 partitioned frozen
    head (LoRA) through `gathered_frozen_head`."""
    weight = head.weight
    return gathered_frozen_head(head) if hasattr(weight, "ds_id") and not weight.requires_grad else head


def gathered_frozen_head(head: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """A frozen ZeRO-3 LM head as a callable that keeps its weight gathered for as long as autograd uses it.

    The log-prob function calls the head inside a checkpoint, which recomputes it in backward before ZeRO's own
    pre-backward gather of the head. Through the module, ZeRO's hooks gather the weight for the recompute and
    release it at its end, and autograd saves a frozen weight as the parameter itself, by then empty again: the
    checkpoint stops with "recomputed metadata: shape [0]". So the head runs here as its linear map on the
    weight gathered for the call and passed detached, which autograd saves as it is: the gathered values live
    until this chunk's backward has used them. A trainable weight needs none of this: the checkpoint saves it
    detached already, and ZeRO's hooks gather it again for its gradient.
    """
    deepspeed = import_deepspeed()
    if not isinstance(head, torch.nn.Linear):
        from pipeline.errors import PipelineError

        kind = f"{type(head).__module__}.{type(head).__qualname__}"
        raise PipelineError(f"ZeRO-3 runs a frozen LM head as a plain linear map, which {kind} is not (LoRA on it?)")
    params = [p for p in (head.weight, head.bias) if p is not None]

    def call(h: Tensor) -> Tensor:
        with deepspeed.zero.GatheredParameters(params):
            bias = None if head.bias is None else head.bias.detach()
            return torch.nn.functional.linear(h, head.weight.detach(), bias)

    return call


def module_device(module: Any) -> torch.device:
    """Where `module` computes: the execution device of its accelerate hook when a device map placed it (weights
    offloaded to the CPU or disk sit on the meta device between calls), else the device of its first weight."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", (hook,)):  # a SequentialHook chains several
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)
    weight: Tensor = next(module.parameters())
    return weight.device


def check_supported(model: Any) -> None:
    """Refuse architectures whose logits are not a plain LM head of the final hidden state."""
    config = model.config
    for attr, neutral in (("final_logit_softcapping", None), ("logit_scale", 1.0)):
        value = getattr(config, attr, neutral)
        if value not in (neutral, None):
            from pipeline.errors import PipelineError

            raise PipelineError(
                f"{config.model_type} models use {attr}={value}, which the chunked log-prob function does not apply yet"
            )


def sequence_forward(
    model: Any,
    batch: PairBatch,
    chunk_size: int = 1024,
    with_metrics: bool = False,
    agree_calls: Callable[[int], int] | None = None,
    padding_free: bool = False,
    group: SequenceGroup | None = None,
) -> SequenceStats:
    """One forward of the model body over the 2B sequences, then the chunked log-prob function.

    padding_free: run the packed row (the model must use a varlen attention, see `pipeline.models.kernels`); the
    log-prob function reads each scored position's hidden state from the row through the packing's index.

    agree_calls: under ZeRO-3 every rank must call the LM head equally often (each call gathers its weights):
    this maps this rank's number of calls to the number all ranks make (`agree_max` over the ranks).

    group: a sequence-parallel group (`pipeline.models.sequence_parallel`): this rank runs its window of every
    sequence, and the stats returned are the whole group's sums.

    A model may be split over devices (`pipeline.models.placement`): the inputs go where the embedding computes, the
    final hidden states and the token tensors where the LM head does, and the stats come back on that device.
    """
    body, lm_head = split_lm(model)
    device = module_device(body.get_input_embeddings())
    inputs, index = body_inputs(batch, padding_free, group)
    hidden = body(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}, use_cache=False)
    hidden = hidden.last_hidden_state
    if index is not None:
        hidden = hidden.reshape(-1, hidden.size(-1))
    head = module_device(lm_head)
    calls = lm_head_calls(batch.completion_mask, chunk_size, index)
    stats = sequence_stats(
        hidden.to(head),
        head_call(lm_head),
        batch.input_ids.to(head),
        batch.completion_mask.to(head),
        batch.shared_len.to(head),
        chunk_size=chunk_size,
        with_metrics=with_metrics,
        min_chunks=calls if agree_calls is None else agree_calls(calls),
        hidden_index=None if index is None else index.to(head),
    )
    return stats if group is None else group.reduce(stats)


def body_inputs(
    batch: PairBatch, padding_free: bool, group: SequenceGroup | None = None
) -> tuple[dict[str, Any], Tensor | None]:
    """The model body's keyword inputs for this layout, and the index of each (sequence, position) in its output
    flattened to (M, H) (None: the output is the (2B, T, H) padded layout itself)."""
    if padding_free:
        row = pack(batch)
        if group is not None:
            return split_packed(row, row.index, group)
        return {
            "input_ids": row.input_ids,
            "position_ids": row.position_ids,
            "cu_seq_lens_q": row.cu_seq_lens,
            "cu_seq_lens_k": row.cu_seq_lens,
            "max_length_q": row.max_length,
            "max_length_k": row.max_length,
        }, row.index
    if group is not None:
        return split_padded(batch, group)
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}, None
