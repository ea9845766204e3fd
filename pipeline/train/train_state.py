"""What a training worker is given, and what a checkpoint carries besides the DeepSpeed shards."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.config import Config
from pipeline.data.entries import TableEntry
from pipeline.report.loggers import LoggerSpec


@dataclass(frozen=True)
class WorkerArgs:
    """Everything the driver hands each Ray Train worker (passed as this object)."""

    cfg: Config
    model_dir: str  # the policy, resolved to a directory or hub id
    total_steps: int
    cpus: int  # torch threads per worker
    loggers: LoggerSpec
    tables: dict[str, TableEntry]  # split -> its training table (memory-mapped by each worker)
    inputs: dict[str, dict[str, Any]]  # split -> the cache entries it came from, for train_summary.json
    after_step: Callable[[int, int], None] | None = None  # (step, rank) -> None; tests inject faults here


STATE_FILE = "state.json"  # in each checkpoint, beside the DeepSpeed shards


@dataclass
class TrainState:
    """The loop's counters, saved with every checkpoint (rank 0 writes it) so that a resumed run continues
    its step count, throughput and the metric window of the logging step in progress."""

    step: int = 0
    num_tokens: int = 0
    pairs_seen: int = 0
    train_seconds: float = 0.0
    window: list[torch.Tensor] = field(default_factory=list)  # reduced metric rows since the last logged step
    config: dict[str, Any] = field(default_factory=dict)  # the effective config (flat keys), for pipeline.train.resume

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "num_tokens": self.num_tokens,
            "pairs_seen": self.pairs_seen,
            "train_seconds": self.train_seconds,
            "window": [row.tolist() for row in self.window],
            "config": self.config,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainState:
        return cls(
            step=int(d["step"]),
            num_tokens=int(d["num_tokens"]),
            pairs_seen=int(d["pairs_seen"]),
            train_seconds=float(d["train_seconds"]),
            window=[torch.tensor(row, dtype=torch.float64) for row in d["window"]],
            config=dict(d.get("config") or {}),
        )
