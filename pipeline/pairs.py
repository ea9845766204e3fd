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
import pyarrow.parquet as pq
from ray.data import DataIterator

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
        rows: dict[str, list[Any]] = self.table.take(pa.array(idx, type=pa.int64())).to_pydict()
        return rows

    def lengths(self) -> np.ndarray:
        """(n, 2) chosen and rejected sequence lengths, for token-budget batches."""
        return np.stack(
            [
                pc.list_value_length(self.table[c]).to_numpy()
                for c in (schema.CHOSEN_INPUT_IDS, schema.REJECTED_INPUT_IDS)
            ],
            axis=1,
        )

    def schedule(self, cfg: Config, num_workers: int) -> Schedule:
        t = cfg.train
        budget = t.max_tokens_per_batch
        return Schedule(
            len(self),
            t.seed,
            num_workers,
            t.per_device_train_batch_size,
            t.gradient_accumulation_steps,
            lengths=self.lengths() if budget else None,
            max_tokens=budget,
            padded=not cfg.model.padding_free,
        )

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


def load_pairs(iterator: DataIterator) -> PairTable:
    """All rows of a Ray Train dataset shard (not split: every rank holds the whole table)."""
    # batch_size=None: whole blocks, never re-cut (Ray's stubs say int, its docs and code allow None)
    blocks = iterator.iter_batches(batch_size=None, batch_format="pyarrow")  # type: ignore[arg-type]
    return PairTable.from_batches(list(blocks))


def training_schedule(cfg: Config, tokenized_files: list[str]) -> Schedule:
    """The run's schedule, from the tokenized pairs (their lengths only when a token budget needs them);
    ConfigError when the data cannot fill one optimizer step."""
    t = cfg.train
    columns = [schema.PAIR_ID]
    if t.max_tokens_per_batch:
        columns += [schema.CHOSEN_INPUT_IDS, schema.REJECTED_INPUT_IDS]
    pairs = PairTable.from_batches([pq.read_table(f, columns=columns) for f in tokenized_files])
    schedule = pairs.schedule(cfg, cfg.scale.num_workers)
    if schedule.steps_in_epoch(0) < 1:
        need = (
            f"num_workers x gradient_accumulation_steps = {schedule.per_step} micro-batches of <= "
            f"{t.max_tokens_per_batch} tokens"
            if t.max_tokens_per_batch
            else f"num_workers x per_device_train_batch_size x gradient_accumulation_steps = "
            f"{schedule.per_step * t.per_device_train_batch_size} pairs"
        )
        raise ConfigError(
            f"one optimizer step needs {need}, but the training data has {len(pairs)} pairs; lower them or add data."
        )
    return schedule
