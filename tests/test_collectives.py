"""Every collective of a training step and of an eval runs on the engine's device, and its result comes back to
the caller's (NCCL rejects CPU tensors; gloo hid that). DESIGN.md invariant 7.

The engine says it computes on `meta`, standing in for CUDA, while its model sits on the CPU. `FakeAccelerator`
makes `meta` a device that holds values: a copy to it gives a tensor whose device reads meta and whose values stay
on the CPU, a copy from it gives those values back, and any other op on it fails. A pretend 2-rank
torch.distributed.all_reduce records the device of every tensor it gets and reduces the values as two ranks that
hold the same ones would: a sum doubles them, a max keeps them.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pipeline import schema
from pipeline.config import Config
from pipeline.data.pairs import PairTable
from pipeline.train import collectives
from pipeline.train.step import Evaluator, micro_step

FAKE = torch.device("meta")
CPU = torch.device("cpu")


class OnFake(torch.Tensor):
    """A tensor on the fake accelerator: its device reads FAKE, its values sit on the CPU."""

    values: torch.Tensor

    @staticmethod
    def __new__(cls, values: torch.Tensor) -> OnFake:
        t = torch.Tensor._make_wrapper_subclass(cls, values.shape, dtype=values.dtype, device=FAKE)
        t.values = values
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise AssertionError(f"{func} on the fake accelerator outside FakeAccelerator")


class FakeAccelerator(TorchDispatchMode):
    """Copies to FAKE wrap the values, copies from it unwrap them; no other op may touch a tensor on FAKE."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            if kwargs.get("device") == FAKE:
                return OnFake(args[0].clone())
            if isinstance(args[0], OnFake):
                return func(args[0].values, **kwargs)
        if any(isinstance(a, OnFake) for a in tree_leaves((args, kwargs))):
            raise AssertionError(f"{func} on the fake accelerator: a result was not copied back")
        return func(*args, **kwargs)


@pytest.fixture
def two_ranks(monkeypatch) -> Iterator[list[torch.device]]:
    """The device of every tensor the pretend 2-rank all_reduce gets, in call order; FakeAccelerator is on."""
    devices: list[torch.device] = []

    def all_reduce(tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> None:
        devices.append(tensor.device)
        values = tensor.values if isinstance(tensor, OnFake) else tensor
        if op == dist.ReduceOp.SUM:
            values.mul_(2)

    monkeypatch.setattr(collectives, "world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    with FakeAccelerator():
        yield devices


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


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(config)


def engine_on(device: torch.device, model: torch.nn.Module) -> SimpleNamespace:
    """What the step reads of a DeepSpeed engine: the module, the device it names, eval/train."""
    return SimpleNamespace(module=model, device=device, eval=model.eval, train=model.train)


def test_a_training_micro_step_makes_its_collectives_on_the_engine_device(two_ranks, model):
    """The step's numbers are those of an engine on the CPU: the round trip to the device changes none."""
    got = micro_step(Config(), engine_on(FAKE, model), pairs(), np.array([0, 1]), pad_id=0)
    assert two_ranks == [FAKE]
    on_cpu = micro_step(Config(), engine_on(CPU, model), pairs(), np.array([0, 1]), pad_id=0)
    assert two_ranks == [FAKE, CPU]
    assert got.loss.item() == on_cpu.loss.item() and torch.equal(got.metric_row, on_cpu.metric_row)


def test_an_eval_makes_every_collective_on_the_engine_device(two_ranks, model):
    """One LM-head agreement per eval batch (filler batches too), then the one reduction of the metric rows."""
    evaluate = Evaluator(Config(), pairs(5), rank=0, world=2, pad_id=0)
    got = evaluate(engine_on(FAKE, model))
    assert two_ranks == [FAKE] * (len(evaluate.batches) + 1) and len(evaluate.batches) >= 1
    two_ranks.clear()
    assert got == evaluate(engine_on(CPU, model)) and set(two_ranks) == {CPU}


def test_the_reduced_values_come_back_on_the_callers_device(two_ranks):
    rows = [torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 4.0], dtype=torch.float64)]
    out = collectives.all_reduce_rows(rows, FAKE)
    assert two_ranks == [FAKE] and out.device == CPU and out.tolist() == [[2.0, 4.0], [6.0, 8.0]]
    assert collectives.agree_max(5, FAKE) == 5 and two_ranks == [FAKE, FAKE]


def test_one_rank_makes_no_collective(monkeypatch):
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: pytest.fail("no collective with 1 rank"))
    assert collectives.agree_max(3, FAKE) == 3
    assert collectives.all_reduce_rows([torch.ones(2)], FAKE).tolist() == [[1.0, 1.0]]
