"""The trained policy as a standard Hugging Face directory, written one tensor at a time.

Under ZeRO-3 every tensor is gathered on its own, copied into rank 0's host memory, appended to its safetensors
shard and released again: no rank holds more than its partition plus one gathered tensor on its device, and rank 0
one tensor in host memory. The shards (at most `shard_bytes` each, HF's file names and index) are planned from the
parameters' shapes before any is gathered, so each file's header is written first and its tensors streamed after
it. At ZeRO 0-2 the same code reads the full parameters without gathering. With LoRA: the adapter (small, gathered
at once), and `merged/`, built the same way, each LoRA layer's base weight plus its deltas (peft's
`get_delta_weight`, the arithmetic of `merge_and_unload`) — the trained module itself is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.models.deepspeed_import import import_deepspeed
from pipeline.models.safetensors_files import INDEX, WEIGHTS, write_header, write_tensor

SHARD_BYTES = 5 * 2**30  # the hub's usual shard size: small enough to stream, few enough files for a 70B model
MERGED = "merged"


@dataclass(frozen=True)
class Saved:
    """One tensor of the saved file: its key, the parameters it reads (gathered together under ZeRO-3), and
    how it is computed from them once they are whole."""

    key: str
    reads: tuple[torch.Tensor, ...]
    value: Callable[[], torch.Tensor]

    @property
    def shape(self) -> list[int]:
        first = self.reads[0]
        return list(getattr(first, "ds_shape", first.shape))  # a ZeRO-3 partition knows its whole shape

    @property
    def dtype(self) -> torch.dtype:
        return self.reads[0].dtype

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.reads[0].element_size()


def export_model(
    module: Any,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    rank: int,
    use_peft: bool,
    shard_bytes: int = SHARD_BYTES,
) -> None:
    """out_dir: the model (or with LoRA the adapter, plus `merged/`) and the tokenizer. `module`: the engine's
    module, a transformers model or a peft model around one. Every rank calls it: under ZeRO-3 each gather is a
    collective."""
    if use_peft:
        adapter = _host_copies(_adapter_tensors(module), rank)
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            module.save_pretrained(out_dir, state_dict=adapter, safe_serialization=True)
            tokenizer.save_pretrained(out_dir)
        base = module.get_base_model()
        write_pretrained(base, saved_tensors(base), out_dir / MERGED, rank, shard_bytes)
        if rank == 0:
            tokenizer.save_pretrained(out_dir / MERGED)
    else:
        write_pretrained(module, saved_tensors(module), out_dir, rank, shard_bytes)
        if rank == 0:
            tokenizer.save_pretrained(out_dir)
    os.sync()


def saved_tensors(model: torch.nn.Module) -> list[Saved]:
    """What `save_pretrained` would write for `model`, merged: every state-dict tensor once (a tied weight under
    the name the model's `_tied_weights_keys` does not mark as the copy), a LoRA layer as its base weight plus
    its adapters' deltas under the base layer's own key, the adapters' weights left out."""
    lora = {name: m for name, m in model.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")}
    tied = {
        f"{name}.{key}" if name else key
        for name, m in model.named_modules()
        for key in (getattr(m, "_tied_weights_keys", None) or {})
    }
    state = model.state_dict(keep_vars=True)
    names: dict[int, list[str]] = {}
    for key, tensor in state.items():
        names.setdefault(id(tensor), []).append(key)
    kept = {i: next((k for k in keys if k not in tied), keys[0]) for i, keys in names.items()}
    out = []
    for key, tensor in state.items():
        if key != kept[id(tensor)]:
            continue  # a tied copy: saved once, under its source's name
        layer_name, _, rest = key.rpartition(".base_layer.")
        if layer_name in lora:
            layer = lora[layer_name]
            merged_key = f"{layer_name}.{rest}"
            if rest == "weight":
                out.append(Saved(merged_key, (tensor, *_adapter_weights(layer)), _merged(layer, tensor)))
            else:
                out.append(Saved(merged_key, (tensor,), _as_is(tensor)))
        elif not any(key.startswith(f"{name}.") for name in lora):  # an adapter's own weights: not in merged/
            out.append(Saved(key, (tensor,), _as_is(tensor)))
    return out


def write_pretrained(model: Any, tensors: list[Saved], out_dir: Path, rank: int, shard_bytes: int) -> None:
    """Writes `model`'s config (as `save_pretrained` does) and `tensors` in shards of at most `shard_bytes` (a
    bigger tensor alone in its shard): `model.safetensors`, or `model-0000k-of-0000n.safetensors` and the index."""
    shards = plan_shards([t.nbytes for t in tensors], shard_bytes)
    names = [shard_name(k, len(shards)) for k in range(len(shards))]
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*out_dir.glob("model-*-of-*.safetensors"), out_dir / WEIGHTS, out_dir / INDEX]:
            stale.unlink(missing_ok=True)  # an earlier export's files, which from_pretrained might read instead
    for name, shard in zip(names, shards):
        stream_shard(out_dir / name, [tensors[i] for i in shard], rank)
    if rank != 0:
        return
    if len(shards) > 1:
        weight_map = {tensors[i].key: name for name, shard in zip(names, shards) for i in shard}
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)


def plan_shards(sizes: list[int], shard_bytes: int) -> list[list[int]]:
    """Consecutive tensors grouped into shards of at most `shard_bytes` bytes (a bigger tensor alone), in order."""
    shards: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        if not shards or (used + size > shard_bytes and shards[-1]):
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards


def shard_name(k: int, n: int) -> str:
    return WEIGHTS if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"


# --- one tensor at a time ---


def stream_shard(path: Path, tensors: list[Saved], rank: int) -> None:
    """One safetensors file written as its tensors are gathered: the header first (planned from the shapes), then
    each tensor's bytes as it comes. Rank 0 writes; the other ranks only take part in the gathers."""
    with open(path, "wb") if rank == 0 else contextlib.nullcontext() as fh:
        if fh is not None:
            write_header(fh, [(t.key, t.dtype, t.shape) for t in tensors])
        for t in tensors:
            with _gathering(t.reads):
                if fh is None:
                    continue
                value = _host_value(t)
                if list(value.shape) != t.shape or value.dtype != t.dtype:
                    raise RuntimeError(
                        f"{t.key}: planned {t.dtype} {t.shape}, computed {value.dtype} {list(value.shape)}"
                    )
                write_tensor(fh, value)


def _host_copies(tensors: list[Saved], rank: int) -> dict[str, torch.Tensor]:
    """Each tensor's value as a host copy on rank 0 (nothing on the others), gathered one tensor at a time: for the
    adapter, which is small."""
    out = {}
    for t in tensors:
        with _gathering(t.reads):
            if rank == 0:
                out[t.key] = _host_value(t)
    return out


def _host_value(t: Saved) -> torch.Tensor:
    """The tensor's value copied into host memory (its parameters gathered by the caller)."""
    return t.value().detach().to("cpu", copy=True).contiguous()


def _gathering(params: tuple[torch.Tensor, ...]) -> contextlib.AbstractContextManager[Any]:
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    deepspeed = import_deepspeed()
    gather: contextlib.AbstractContextManager[Any] = deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
    return gather


def _adapter_tensors(module: torch.nn.Module) -> list[Saved]:
    return [Saved(key, (p,), _as_is(p)) for key, p in module.named_parameters() if p.requires_grad]


def _adapter_weights(layer: Any) -> list[torch.Tensor]:
    return [m.weight for a in layer.active_adapters for m in (layer.lora_A[a], layer.lora_B[a])]


def _as_is(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor


def _merged(layer: Any, weight: torch.Tensor) -> Callable[[], torch.Tensor]:
    def value() -> torch.Tensor:
        merged = weight.detach().clone()
        for adapter in layer.active_adapters:
            merged += layer.get_delta_weight(adapter).to(merged.dtype)
        return merged

    return value
