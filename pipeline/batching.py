"""The data schedule: which pairs each rank sees at each optimizer step. Pure, so resuming, changing the
worker count or accumulating gradients never changes what a global batch holds.

Per epoch e the pairs (sorted by pair_id) are permuted by a generator seeded with (seed, e). Optimizer
step s of the epoch takes the global batch `order[s*G:(s+1)*G]`, G = workers x per-device batch x
accumulation; its micro-batch m on rank r is slice `(m*workers + r)*B` of it. So 2 workers x 4 pairs
see the same 8 pairs per step as 1 worker x 8, and 4 x 2 accumulated the same as 8 x 1. The last
partial global batch of an epoch is left out (its pairs differ each epoch), so every rank runs the same
number of steps.
"""

from __future__ import annotations

import math

import numpy as np


def global_batch_size(num_workers: int, per_device: int, accumulation: int) -> int:
    return num_workers * per_device * accumulation


def steps_per_epoch(num_pairs: int, global_batch: int) -> int:
    return num_pairs // global_batch


def total_steps(num_pairs: int, global_batch: int, num_train_epochs: float, max_steps: int) -> int:
    """max_steps when set, else ceil(epochs x steps per epoch) (TRL / transformers rule)."""
    if max_steps > 0:
        return max_steps
    return math.ceil(num_train_epochs * steps_per_epoch(num_pairs, global_batch))


def epoch_order(num_pairs: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_pairs)


def micro_batches(order: np.ndarray, step_in_epoch: int, rank: int, num_workers: int, per_device: int,
                  accumulation: int) -> list[np.ndarray]:
    """Row indices of rank `rank`'s micro-batches for one optimizer step."""
    g = global_batch_size(num_workers, per_device, accumulation)
    batch = order[step_in_epoch * g: (step_in_epoch + 1) * g]
    return [batch[(m * num_workers + rank) * per_device: (m * num_workers + rank + 1) * per_device]
            for m in range(accumulation)]


def eval_batches(num_pairs: int, rank: int, num_workers: int, per_device: int) -> list[np.ndarray]:
    """Every eval pair exactly once, in order, spread over ranks; ranks with fewer pairs get empty batches
    so that every rank runs the same number of forwards."""
    rows = np.arange(num_pairs)
    batches = math.ceil(num_pairs / (num_workers * per_device))
    out = []
    for b in range(batches):
        start = (b * num_workers + rank) * per_device
        out.append(rows[start: start + per_device])
    return out
