"""Where a model's weights go when one process has several devices: a device map that fits, or a clear error.

    placement = gpu_placement(2)                                # {0: bytes, 1: bytes}: weights per visible GPU
    model = load_causal_lm(path, "bfloat16", placement=placement)  # each tensor read straight onto its device

A placement is accelerate's `max_memory`: bytes of weights per device, keyed by GPU index, "cpu" (weights held
in host memory and brought to the first GPU, or run on the CPU, at every forward) and "disk" (present = allowed:
weights read from the model's safetensors files at every forward). `device_map` lays the modules out on an empty
(meta) model, so a model that fits nowhere is refused before a single weight is read, and the load follows the
same map. The scoring actors use GPUs only (`gpus_per_ref_actor`); CPU and disk offload stream every weight at
every batch, slower than asking for more GPUs, and are here for the tests and for callers that accept that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pipeline.errors import PipelineError

Placement = Mapping[int | str, int]
GPU_WEIGHT_FRACTION = 0.85  # of each GPU's memory; the rest is for activations, the LM-head chunks and CUDA itself
GIB = 1024**3


def gpu_placement(gpus: int) -> dict[int | str, int]:
    """Bytes of weights for each of the first `gpus` visible GPUs: what is free now, less the share of its
    memory that activations need (1 - GPU_WEIGHT_FRACTION)."""
    import torch

    visible = torch.cuda.device_count()
    if visible < gpus:
        raise PipelineError(
            f"this process sees {visible} GPU(s), gpus_per_ref_actor asks for {gpus}: "
            "is CUDA_VISIBLE_DEVICES narrower than the actor's GPUs?"
        )
    budget: dict[int | str, int] = {}
    for i in range(gpus):
        free, total = torch.cuda.mem_get_info(i)
        budget[i] = max(0, int(free - (1 - GPU_WEIGHT_FRACTION) * total))
    return budget


def device_map(model: str, dtype: str, placement: Placement, trust_remote_code: bool = False) -> dict[str, int | str]:
    """Module name -> device for `model` in `dtype` under `placement`. One device: all of it, if its weights fit.
    Several: spread evenly over the GPUs when that fits, else filled in order (accelerate's "balanced", then
    "sequential"; both keep room for the largest module on the first GPU). A PipelineError if any weight would
    be left for a device the placement does not name (the disk, unless "disk" is in it)."""
    from accelerate.utils import compute_module_sizes

    meta = _empty_model(model, dtype, trust_remote_code)
    sizes = compute_module_sizes(meta)
    size = sizes[""]
    memory = {d: b for d, b in placement.items() if d != "disk"}
    if len(placement) == 1 and size <= sum(memory.values()):
        return {"": next(iter(placement))}
    if not meta._no_split_modules:
        raise PipelineError(
            f"model {model} ({meta.config.model_type}) does not name the layers that must stay on one device "
            f"(_no_split_modules), so it cannot be split over devices; it needs {size / GIB:.2f} GiB on one"
        )
    found = _fit(meta, placement, balanced=True) or _fit(meta, placement)
    if found is not None:
        if len(set(found.values())) > 1:
            held = {d: sum(sizes[m] for m, where in found.items() if where == d) for d in dict.fromkeys(found.values())}
            spread = ", ".join(f"{_name(d)} {b / GIB:.2f}" for d, b in held.items())
            print(f"[models] {model}: {size / GIB:.2f} GiB of weights split over {spread} GiB", flush=True)
        return found
    gpus = [b for d, b in memory.items() if isinstance(d, int)]
    if gpus:
        least = max(len(gpus) + 1, math.ceil(size / max(min(gpus), 1)))
        tries = range(least, least + 8) if least <= 256 else range(0)
        need = next((n for n in tries if _fit(meta, dict.fromkeys(range(n), min(gpus)))), None)
        hint = (
            f"raise gpus_per_ref_actor to {f'at least {need}' if need else f'more than {len(gpus)}'} (GPUs of one "
            f"node like these; each keeps {100 * (1 - GPU_WEIGHT_FRACTION):.0f}% of its memory for activations)"
        )
    else:
        hint = "give the placement more memory, or allow disk offload"
    if dtype == "float32":
        hint += ", or set dtype: bfloat16 (half the size)"
    held_by = ", ".join(f"{_name(d)} {b / GIB:.2f} GiB" for d, b in memory.items())
    raise PipelineError(
        f"model {model} does not fit: its weights take {size / GIB:.2f} GiB in {dtype}, and the devices hold "
        f"{held_by} for weights ({sum(memory.values()) / GIB:.2f} GiB in all, less room for its largest layer "
        f"on the first); {hint}"
    )


def _empty_model(model: str, dtype: str, trust_remote_code: bool) -> Any:
    """The model with its weights on the meta device: shapes and sizes, no memory, no file read but config.json."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot read the config of model {model}: {e}") from None
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )


def _fit(meta: Any, placement: Placement, balanced: bool = False) -> dict[str, int | str] | None:
    """accelerate's layout of `meta` (no module split below the model's no-split classes), or None when some of it
    would go to the disk that the placement does not allow."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = list(meta._no_split_modules or [])
    budget = dict(placement)
    if balanced:
        if sum(isinstance(d, int) for d in budget) < 2:
            return None
        budget = get_balanced_memory(meta, budget, no_split_module_classes=no_split)
    layout = infer_auto_device_map(meta, max_memory=budget, no_split_module_classes=no_split)
    if "disk" in layout.values() and "disk" not in placement:
        return None
    return dict(layout)


def _name(device: int | str) -> str:
    return f"GPU {device}" if isinstance(device, int) else str(device)
