"""The pure data schedule: fixed-size and token-budget micro-batches."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.batching import Schedule, eval_batches, pack_by_budget, pair_cost


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(20, 600, size=(n, 2))


def test_pack_by_budget_by_hand():
    lengths = np.array([[3, 5], [4, 4], [6, 2], [10, 1], [9, 9]])
    order = np.arange(5)
    # packed costs 8, 8, 8, 11, 18 -> budget 20: [0,1] (16; +8 = 24 > 20), [2,3] (19), [4] (18)
    assert [b.tolist() for b in pack_by_budget(order, lengths, 20, padded=False)] == [[0, 1], [2, 3], [4]]
    # padded cost = 2 x pairs x longest: [0,1,2] = 2*3*6 = 36 <= 40, + pair 3 -> 2*4*10 = 80; [3,4] = 2*2*10 = 40
    assert [b.tolist() for b in pack_by_budget(order, lengths, 40, padded=True)] == [[0, 1, 2], [3, 4]]
    # a pair over the budget on its own still gets a micro-batch
    assert [b.tolist() for b in pack_by_budget(order, lengths, 10, padded=False)] == [[0], [1], [2], [3], [4]]
    assert pair_cost(lengths, padded=True).tolist() == [10, 8, 12, 20, 18]


def test_fixed_schedule_matches_the_global_batch_rule():
    """Step s of an epoch is order[s*G:(s+1)*G], G = 8; rank r's micro m = slice (m*W + r)*B of it."""
    s = Schedule(num_pairs=37, seed=3, num_workers=2, per_device=2, accumulation=2)
    order = np.random.default_rng([3, 0]).permutation(37)
    assert s.steps_in_epoch(0) == 4 and s.left_out(0) == 5
    for step in range(4):
        batch = order[step * 8 : (step + 1) * 8]
        for rank in range(2):
            got = s.micro_batches(step, rank)
            want = [batch[(m * 2 + rank) * 2 : (m * 2 + rank + 1) * 2] for m in range(2)]
            assert [g.tolist() for g in got] == [w.tolist() for w in want]
        assert s.loss_scale(step, 2) == 1.0
    # step 4 is epoch 1, step 0, with a new permutation
    assert s.micro_batches(4, 0)[0].tolist() == np.random.default_rng([3, 1]).permutation(37)[:2].tolist()
    assert s.total_steps(2.5, -1) == 4 + 4 + 2 and s.total_steps(1.0, 7) == 7
    assert s.epoch_progress(6) == 1.5


def test_one_worker_of_eight_equals_two_workers_of_four():
    one = Schedule(100, seed=1, num_workers=1, per_device=8, accumulation=1)
    two = Schedule(100, seed=1, num_workers=2, per_device=4, accumulation=1)
    for step in range(one.steps_in_epoch(0)):
        merged = np.concatenate([two.micro_batches(step, 0)[0], two.micro_batches(step, 1)[0]])
        assert sorted(one.micro_batches(step, 0)[0].tolist()) == sorted(merged.tolist())


@pytest.mark.parametrize("padded", [False, True])
def test_token_budget_schedule(padded):
    n, budget = 3000, 4000
    lengths = _lengths(n)
    s = Schedule(
        n, seed=7, num_workers=2, per_device=8, accumulation=3, lengths=lengths, max_tokens=budget, padded=padded
    )
    for epoch in range(2):
        steps = s.steps_in_epoch(epoch)
        batches = [b for k in range(steps) for b in s.step_batches(sum(map(s.steps_in_epoch, range(epoch))) + k)]
        seen = np.concatenate(batches)
        assert len(set(seen.tolist())) == len(seen)  # no pair twice in an epoch
        assert len(seen) + s.left_out(epoch) == n  # nothing lost without being counted
        assert s.left_out(epoch) < n // 20
        for b in batches:
            cost = 2 * len(b) * lengths[b].max() if padded else lengths[b].sum()
            assert cost <= budget or len(b) == 1
        # length-grouped: the spread of lengths inside a micro-batch is far below the data's
        inner = np.mean([np.ptp(pair_cost(lengths[b], padded)) for b in batches if len(b) > 1])
        assert inner < 0.1 * np.ptp(pair_cost(lengths, padded))
    first = [b.tolist() for b in s.step_batches(0)]
    again = Schedule(
        n, seed=7, num_workers=2, per_device=8, accumulation=3, lengths=lengths, max_tokens=budget, padded=padded
    )
    assert [b.tolist() for b in again.step_batches(0)] == first  # pure: same inputs, same schedule
    assert [b.tolist() for b in s.step_batches(s.steps_in_epoch(0))] != first  # a new epoch reshuffles


def test_loss_scale_makes_the_step_loss_a_mean_over_pairs():
    """DeepSpeed averages the k = workers x accumulation micro-batch losses; scaled, that average is the pair mean."""
    lengths = _lengths(500, seed=2)
    s = Schedule(500, seed=0, num_workers=2, per_device=8, accumulation=2, lengths=lengths, max_tokens=3000)
    per_pair = np.random.default_rng(5).normal(size=500)
    assert len({len(b) for step in range(3) for b in s.step_batches(step)}) > 1  # unequal pair counts
    for step in range(3):
        batches = s.step_batches(step)
        averaged = np.mean([s.loss_scale(step, len(b)) * per_pair[b].mean() for b in batches])
        assert averaged == pytest.approx(per_pair[np.concatenate(batches)].mean(), rel=1e-12)


@pytest.mark.parametrize("budget", [None, 2500])
def test_eval_batches_cover_every_pair_once_with_equal_counts_per_rank(budget):
    lengths = _lengths(103, seed=4)
    per_rank = [eval_batches(103, r, 3, 8, lengths=lengths, max_tokens=budget) for r in range(3)]
    assert len({len(p) for p in per_rank}) == 1
    seen = np.concatenate([b for p in per_rank for b in p])
    assert sorted(seen.tolist()) == list(range(103))
