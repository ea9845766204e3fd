"""The training pairs of one split as a table, and the schedule cut from it.

Row i of the table is pair i of the schedule (pipeline.core.batching): rows are sorted by pair_id, so the
order does not depend on how the data reached the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.config import Config
from pipeline.core.batching import Schedule, eval_batches
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class PairTable:
    """Tokenized pairs joined with their reference scores, sorted by pair_id (row i = schedule index i)."""

    table: pa.Table

    @classmethod
    def from_batches(cls, batches: list[pa.Table]) -> PairTable:
        table = pa.concat_tables(batches) if batches else pa.table({})
        return cls(table.sort_by(schema.PAIR_ID).combine_chunks())

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def rows(self, idx: np.ndarray) -> dict[str, list[Any]]:
        """Rows `idx`, copying only those rows: `Table.take` on a memory-mapped table of several record
        batches concatenates each whole column first (a private copy of the table per call)."""
        picked = pa.concat_tables([self.table.slice(int(i), 1) for i in idx], promote_options="none")
        rows: dict[str, list[Any]] = picked.to_pydict()
        return rows

    def lengths(self) -> np.ndarray:
        """(n, 2) chosen and rejected sequence lengths, for token-budget batches (stored in a training table)."""
        if schema.CHOSEN_LEN in self.table.column_names:
            columns = [self.table[c].to_numpy() for c in (schema.CHOSEN_LEN, schema.REJECTED_LEN)]
        else:
            columns = [
                pc.list_value_length(self.table[c]).to_numpy()
                for c in (schema.CHOSEN_INPUT_IDS, schema.REJECTED_INPUT_IDS)
            ]
        return np.stack(columns, axis=1)

    def schedule(self, cfg: Config, num_workers: int) -> Schedule:
        return make_schedule(cfg, len(self), self.lengths() if cfg.train.max_tokens_per_batch else None, num_workers)

    def eval_batches(self, cfg: Config, rank: int, num_workers: int) -> list[np.ndarray]:
        budget = cfg.train.max_tokens_per_batch
        return eval_batches(
            len(self),
            rank,
            num_workers,
            cfg.train.per_device_eval_batch_size,
            lengths=self.lengths() if budget else None,
            max_tokens=budget,
            padded=not cfg.model.padding_free,
        )


def make_schedule(cfg: Config, n_pairs: int, lengths: np.ndarray | None, num_workers: int) -> Schedule:
    """The run's schedule over `n_pairs` pairs (`lengths`, (n, 2), needed only with a token budget) for
    `num_workers` data-parallel ranks (sequence-parallel groups count once); ConfigError when the data cannot
    fill one optimizer step."""
    t = cfg.train
    schedule = Schedule(
        n_pairs,
        t.seed,
        num_workers,
        t.per_device_train_batch_size,
        t.gradient_accumulation_steps,
        lengths=lengths,
        max_tokens=t.max_tokens_per_batch,
        padded=not cfg.model.padding_free,
    )
    if schedule.steps_in_epoch(0) < 1:
        workers = "num_workers" if cfg.scale.sequence_parallel_size == 1 else "num_workers / sequence_parallel_size"
        need = (
            f"{workers} x gradient_accumulation_steps = {schedule.per_step} micro-batches of <= "
            f"{t.max_tokens_per_batch} tokens"
            if t.max_tokens_per_batch
            else f"{workers} x per_device_train_batch_size x gradient_accumulation_steps = "
            f"{schedule.per_step * t.per_device_train_batch_size} pairs"
        )
        raise ConfigError(
            f"one optimizer step needs {need}, but the training data has {n_pairs} pairs; lower them or add data."
        )
    return schedule
