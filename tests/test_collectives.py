"""Every collective of a training step runs on the engine's device (NCCL rejects CPU tensors; gloo hid that).

A fake device stands in for CUDA: `meta`. torch.distributed.all_reduce is replaced by a recorder that notes
the device of the tensor it gets and stops there (a meta tensor holds no values to reduce or copy back).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import schema
from pipeline.config import Config
from pipeline.data.pairs import PairTable
from pipeline.train import collectives
from pipeline.train.step import Evaluator, micro_step

FAKE = torch.device("meta")


class Reduced(Exception):
    def __init__(self, tensor: torch.Tensor):
        super().__init__(str(tensor.device))
        self.device = tensor.device


@pytest.fixture
def two_ranks(monkeypatch):
    """A pretend 2-rank group whose all_reduce reports the device it was handed."""
    calls = []

    def record(tensor, op=None):
        calls.append(tensor.device)
        raise Reduced(tensor)

    monkeypatch.setattr(collectives, "world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", record)
    return calls


def pairs(n: int = 3) -> PairTable:
    ids = [[1, 2, 3, 4 + i] for i in range(n)]
    zeros = [0.0] * n
    return PairTable.from_batches(
        [
            pa.table(
                {
                    schema.PAIR_ID: [f"{i:032x}" for i in range(n)],
                    schema.CHOSEN_INPUT_IDS: ids,
                    schema.REJECTED_INPUT_IDS: [[*r[:-1], 9] for r in ids],
                    schema.CHOSEN_COMPLETION_START: [2] * n,
                    schema.REJECTED_COMPLETION_START: [2] * n,
                    **{
                        c: zeros
                        for c in (
                            schema.REF_CHOSEN_SHARED_LOGPS,
                            schema.REF_CHOSEN_TAIL_LOGPS,
                            schema.REF_REJECTED_SHARED_LOGPS,
                            schema.REF_REJECTED_TAIL_LOGPS,
                        )
                    },
                }
            )
        ]
    )


def test_micro_step_agrees_on_lm_head_calls_on_the_engine_device(two_ranks):
    engine = SimpleNamespace(device=FAKE)  # the collective comes before any use of the model
    with pytest.raises(Reduced) as got:
        micro_step(Config(), engine, pairs(), np.array([0, 1]), pad_id=0)
    assert got.value.device == FAKE and two_ranks == [FAKE]


def test_step_metrics_are_reduced_on_the_engine_device(two_ranks):
    with pytest.raises(Reduced) as got:
        collectives.all_reduce_rows([torch.ones(4, dtype=torch.float64)] * 2, FAKE)
    assert got.value.device == FAKE


def test_eval_reduces_on_the_engine_device(two_ranks, monkeypatch):
    row = torch.ones(4, dtype=torch.float64)
    monkeypatch.setattr("pipeline.train.step.micro_step", lambda *a, **k: SimpleNamespace(metric_row=row))
    engine = SimpleNamespace(device=FAKE, eval=lambda: None, train=lambda: None)
    evaluate = Evaluator(Config(), pairs(3), rank=0, world=2, pad_id=0)
    with pytest.raises(Reduced) as got:
        evaluate(engine)
    assert got.value.device == FAKE and two_ranks == [FAKE]


def test_values_come_back_on_the_callers_device(monkeypatch):
    """With a device that holds values (the CPU here), the reduced tensor returns where it came from."""
    monkeypatch.setattr(collectives, "world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: t.mul_(2))
    rows = [torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 4.0], dtype=torch.float64)]
    out = collectives.all_reduce_rows(rows, torch.device("cpu"))
    assert out.device.type == "cpu" and out.tolist() == [[2.0, 4.0], [6.0, 8.0]]
    assert collectives.agree_max(5, torch.device("cpu")) == 10


def test_one_rank_makes_no_collective(monkeypatch):
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: pytest.fail("no collective with 1 rank"))
    assert collectives.agree_max(3, FAKE) == 3
    assert collectives.all_reduce_rows([torch.ones(2)], FAKE).tolist() == [[1.0, 1.0]]
