"""The data schedule: which pairs each rank sees at each optimizer step. Pure, so resuming, changing the
worker count or accumulating gradients never changes what a global batch holds.

Per epoch e the pairs (sorted by pair_id) are permuted by a generator seeded with (seed, e) and cut into
micro-batches; optimizer step s of the epoch takes the next k = workers x accumulation micro-batches, and
rank r's m-th micro-batch is number m*workers + r of them. Two ways to cut:
- fixed: `per_device` consecutive pairs each, so 2 workers x 4 pairs see the same 8 pairs per step as
  1 worker x 8, and 4 x 2 accumulated the same as 8 x 1;
- token budget (`max_tokens`): each window of WINDOW permuted pairs is sorted by length and cut greedily
  so no micro-batch exceeds the budget (a pair too long for it alone gets a micro-batch of its own), then
  the epoch's micro-batches are shuffled. Similar lengths share a micro-batch (little padding, steady
  memory), while windows and the shuffle keep the order random. Micro-batches then hold different numbers
  of pairs, so the trainer weights each by its pairs (`Schedule.loss_scale`): the step's loss stays the
  mean over its pairs, as with fixed batches, instead of over-weighting pairs in sparse long batches.
The micro-batches left over after the last full step of an epoch are left out (they differ each epoch),
so every rank runs the same number of steps; `left_out` counts them.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

WINDOW = 4096  # pairs sorted by length together under a token budget


def pair_cost(lengths: np.ndarray, padded: bool) -> np.ndarray:
    """Tokens one pair adds to a forward: (n, 2) chosen/rejected lengths -> (n,). Padded rows cost the
    longer side twice."""
    cost: np.ndarray = 2 * lengths.max(axis=1) if padded else lengths.sum(axis=1)
    return cost


def pack_by_budget(order: np.ndarray, lengths: np.ndarray, max_tokens: int, padded: bool) -> list[np.ndarray]:
    """Cut `order` (already length-sorted) into consecutive micro-batches of at most `max_tokens` tokens: the
    sum of the pairs' tokens, or with padding 2 x pairs x the longest sequence."""
    batches: list[np.ndarray] = []
    start, total, widest = 0, 0, 0
    for i, pair in enumerate(order):
        c, r = (int(x) for x in lengths[pair])
        width = max(widest, c, r)
        cost = 2 * (i - start + 1) * width if padded else total + c + r
        if cost > max_tokens and i > start:
            batches.append(order[start:i])
            start, total, width = i, 0, max(c, r)
        total += c + r
        widest = width
    if len(order) > start:
        batches.append(order[start:])
    return batches


class Schedule:
    """The micro-batches of every step for one run's training pairs.

    Args:
        num_pairs: training pairs (row i = the i-th pair by pair_id).
        lengths: (num_pairs, 2) chosen/rejected token counts; needed only with `max_tokens`.
        max_tokens: token budget per micro-batch; None = `per_device` pairs each.
        padded: whether padding counts against the budget (padding_free off).
    """

    def __init__(
        self,
        num_pairs: int,
        seed: int,
        num_workers: int,
        per_device: int,
        accumulation: int,
        lengths: np.ndarray | None = None,
        max_tokens: int | None = None,
        padded: bool = False,
    ):
        if max_tokens is not None and (lengths is None or len(lengths) != num_pairs):
            raise ValueError("a token budget needs the (num_pairs, 2) lengths")
        self.num_pairs, self.seed, self.num_workers = num_pairs, seed, num_workers
        self.per_device, self.accumulation = per_device, accumulation
        self.lengths, self.max_tokens, self.padded = lengths, max_tokens, padded
        self.per_step = num_workers * accumulation  # micro-batches per optimizer step
        self._epoch = lru_cache(maxsize=2)(self._cut_epoch)
        self._steps: dict[int, int] = {}

    def _cut_epoch(self, epoch: int) -> tuple[np.ndarray, ...]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs)
        if self.max_tokens is None:
            usable = self.num_pairs // (self.per_step * self.per_device) * self.per_step
            return tuple(order[i * self.per_device : (i + 1) * self.per_device] for i in range(usable))
        assert self.lengths is not None
        cost = pair_cost(self.lengths, self.padded)
        batches: list[np.ndarray] = []
        for w in range(0, self.num_pairs, WINDOW):
            window = order[w : w + WINDOW]
            window = window[np.argsort(cost[window], kind="stable")]
            batches.extend(pack_by_budget(window, self.lengths, self.max_tokens, self.padded))
        shuffled = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
        usable = len(batches) // self.per_step * self.per_step
        return tuple(batches[i] for i in shuffled[:usable])

    def steps_in_epoch(self, epoch: int) -> int:
        if epoch not in self._steps:
            self._steps[epoch] = len(self._epoch(epoch)) // self.per_step
        return self._steps[epoch]

    def left_out(self, epoch: int) -> int:
        """Pairs of this epoch that fall after its last full step."""
        return self.num_pairs - sum(len(b) for b in self._epoch(epoch))

    def locate(self, step: int) -> tuple[int, int]:
        """Global step (0-based) -> (epoch, step within the epoch)."""
        epoch = 0
        while step >= (n := self.steps_in_epoch(epoch)):
            if n == 0:
                raise ValueError("an epoch has no full optimizer step")
            step -= n
            epoch += 1
        return epoch, step

    def epoch_progress(self, steps_done: int) -> float:
        """Epochs completed after `steps_done` steps, fractional (the `epoch` metric)."""
        epoch, in_epoch = self.locate(steps_done)
        return epoch + in_epoch / self.steps_in_epoch(epoch)

    def step_batches(self, step: int) -> list[np.ndarray]:
        """All micro-batches of optimizer step `step` (0-based), rank-major within each accumulation slot."""
        epoch, in_epoch = self.locate(step)
        return list(self._epoch(epoch)[in_epoch * self.per_step : (in_epoch + 1) * self.per_step])

    def micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        """Row indices of rank `rank`'s micro-batches for optimizer step `step`."""
        batches = self.step_batches(step)
        return [batches[m * self.num_workers + rank] for m in range(self.accumulation)]

    def loss_scale(self, step: int, pairs_in_micro_batch: int) -> float:
        """Factor on a micro-batch's mean loss so that averaging over the step's micro-batches (what DeepSpeed
        does) gives the mean over the step's pairs: n_micro x k / n_step. 1 with fixed batches."""
        return pairs_in_micro_batch * self.per_step / sum(len(b) for b in self.step_batches(step))

    def total_steps(self, num_train_epochs: float, max_steps: int) -> int:
        """max_steps when set, else whole epochs plus ceil(fraction x the next epoch's steps) (transformers'
        rule, per epoch since a token budget gives each epoch its own count)."""
        if max_steps > 0:
            return max_steps
        whole = int(num_train_epochs)
        total = sum(self.steps_in_epoch(e) for e in range(whole))
        return total + math.ceil((num_train_epochs - whole) * self.steps_in_epoch(whole))


def eval_batches(
    num_pairs: int,
    rank: int,
    num_workers: int,
    per_device: int,
    lengths: np.ndarray | None = None,
    max_tokens: int | None = None,
    padded: bool = False,
) -> list[np.ndarray]:
    """Every eval pair exactly once, spread over ranks; ranks with fewer batches get empty ones so that every
    rank runs the same number of forwards. With a token budget the pairs are cut in length order."""
    if max_tokens is None:
        rows = np.arange(num_pairs)
        batches = [rows[i : i + per_device] for i in range(0, num_pairs, per_device)]
    else:
        assert lengths is not None
        order = np.argsort(pair_cost(lengths, padded), kind="stable")
        batches = pack_by_budget(order, lengths, max_tokens, padded)
    rounds = math.ceil(len(batches) / num_workers)
    empty = np.zeros(0, dtype=np.int64)
    return [batches[i] if (i := b * num_workers + rank) < len(batches) else empty for b in range(rounds)]
