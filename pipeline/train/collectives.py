"""Every collective the training loop makes itself, on the device of the engine.

Ray Train gives GPU workers an NCCL process group, and NCCL accepts only CUDA tensors; gloo (CPU workers)
accepts CPU tensors. So each collective here moves its tensor to the engine's device, reduces it there
and brings the result back. We chose this over a second, gloo, process group for CPU tensors: one group
is what DeepSpeed already uses, it needs no extra set-up or ports, and the tensors are a few numbers per
optimizer step, so the copy costs nothing next to the step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Ranks in the default process group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(t: Tensor, device: torch.device, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """`t` reduced over all ranks (sum, or `op`), computed on `device` and returned on `t`'s device."""
    if world_size() == 1:
        return t
    moved = t.to(device)
    dist.all_reduce(moved, op=op)
    return moved.to(t.device)


def agree_max(value: int, device: torch.device) -> int:
    """The largest `value` of any rank."""
    return int(all_reduce(torch.tensor([value], dtype=torch.long), device, dist.ReduceOp.MAX).item())


def all_reduce_rows(rows: list[Tensor], device: torch.device) -> Tensor:
    """A step's micro-batch metric rows, stacked and summed over ranks: one collective per step, on the CPU."""
    return all_reduce(torch.stack(rows).cpu(), device)
