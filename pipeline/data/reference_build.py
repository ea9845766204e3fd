"""A stage-2 reference entry while it is being scored: its shards planned (or a resumed entry's complete ones
kept), the scored pairs gathered per shard, each shard written as soon as all its pairs are in, the manifest
last — and only when every pair sent to the scorers came back.

    entry = plan_entry(cfg, "train", tokenized, key, parts, path, shard_pairs)   # holding the entry's claim
    for block in scored_blocks:
        entry.add(block, start)        # writes every shard the block completes
    scores = entry.commit(cfg)

Shards are ranges of the pair_id hash space (`entries.shard_of`): stage 1 writes pairs sorted by pair_id, so
shards complete one after another and a killed job loses only the unfinished ones.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.cache import manifests, storage
from pipeline.config import Config
from pipeline.data import entries
from pipeline.data.entries import REFERENCE, ReferenceScores, TokenizedData, shard_name, shard_of
from pipeline.errors import CacheError


def label(split: str) -> str:
    return f"[score-ref] {split}"


@dataclass
class ReferenceBuild:
    """One split's reference entry that this job holds the claim of and scores."""

    split: str
    tokenized: TokenizedData
    key: str
    parts: dict[str, Any]
    path: storage.Location
    pairs: int
    expected: np.ndarray  # pairs per shard
    missing: frozenset[int]  # shards still to score
    pending: dict[int, list[pa.Table]] = field(default_factory=lambda: defaultdict(list))
    totals: dict[str, int] = field(default_factory=lambda: {"tokens": 0, "padded": 0, "pairs": 0})
    written: int = 0
    elapsed: float = 0.0  # from the scoring's start to this entry's last shard

    def add(self, block: pa.Table, start: float) -> None:
        """Count one block of this entry's scored pairs (with the scorer's `_tokens`/`_padded` columns) and write
        every shard it completes."""
        self.totals["tokens"] += int(pc.sum(block.column("_tokens")).as_py() or 0)
        self.totals["padded"] += int(pc.sum(block.column("_padded")).as_py() or 0)
        self.totals["pairs"] += block.num_rows
        shards = shard_of(block.column(schema.PAIR_ID).to_pylist(), len(self.expected))
        for i in np.unique(shards):
            part = block.filter(pa.array(shards == i)).select(schema.REFERENCE_SCHEMA.names)
            self.pending[int(i)].append(part)
            if sum(t.num_rows for t in self.pending[int(i)]) == self.expected[i]:
                self._write_shard(int(i), self.pending.pop(int(i)))
                self.written += 1
                self.elapsed = time.time() - start
                print(
                    f"{label(self.split)}: {self.written}/{len(self.missing)} shards written, "
                    f"{self.totals['pairs']} pairs scored",
                    flush=True,
                )

    def commit(self, cfg: Config) -> ReferenceScores:
        """Write the manifest last, once every pair the entry missed came back scored."""
        wanted = int(self.expected[sorted(self.missing)].sum())
        if self.totals["pairs"] != wanted or self.pending:
            raise CacheError(
                f"{label(self.split)}: {self.totals['pairs']} pairs came back from the scoring pool, {wanted} were "
                f"sent; {self.path} stays unfinished (a rerun scores the shards still missing)"
            )
        num_shards = len(self.expected)
        manifest = manifests.write_manifest(
            self.path,
            self.key,
            REFERENCE,
            [shard_name(i) for i in range(num_shards)],
            rows=self.pairs,
            inputs=self.parts,
            reference_model=cfg.ref_model_name,
            split=self.split,
            shards=num_shards,
            timings={"score_s": round(self.elapsed, 2), "pairs_scored_now": self.totals["pairs"]},
            padding_fraction=self.padding(),
            versions=_versions(),
        )
        (self.path / entries.PLAN).unlink(missing_ok=True)
        pairs = self.totals["pairs"]
        rate = pairs / self.elapsed if self.elapsed > 0 else 0.0
        print(
            f"{label(self.split)}: {pairs} pairs scored in {self.elapsed:.1f}s ({rate:.1f} pairs/s), padding "
            f"{100 * self.padding():.1f}% of batch tokens",
            flush=True,
        )
        return ReferenceScores(self.path, self.key, manifest)

    def padding(self) -> float:
        batch_tokens = self.totals["tokens"] + self.totals["padded"]
        return self.totals["padded"] / batch_tokens if batch_tokens else 0.0

    def _write_shard(self, i: int, parts: list[pa.Table]) -> None:
        table = pa.concat_tables(parts).cast(schema.REFERENCE_SCHEMA).sort_by(schema.PAIR_ID)
        with storage.atomic_target(self.path / shard_name(i)) as tmp, tmp.open("wb") as fh:
            pq.write_table(table, fh)


def plan_entry(
    cfg: Config,
    split: str,
    tokenized: TokenizedData,
    key: str,
    parts: dict[str, Any],
    path: storage.Location,
    shard_pairs: int,
) -> ReferenceBuild:
    """The entry's shards and which of them are still to score (a resumed entry keeps its complete shards)."""
    fs, files = storage.parquet_source(tokenized.files)
    pair_ids = pq.ParquetDataset(files, filesystem=fs).read(columns=[schema.PAIR_ID]).column(schema.PAIR_ID).to_pylist()
    num_shards = max(1, math.ceil(len(pair_ids) / shard_pairs))
    expected = np.bincount(shard_of(pair_ids, num_shards), minlength=num_shards)
    done = entries.check_plan_and_done(path, key, num_shards, expected)
    if done:
        print(f"{label(split)}: resuming {path}: {len(done)}/{num_shards} shards already scored", flush=True)
    else:
        print(f"{label(split)}: scoring {len(pair_ids)} pairs with {cfg.ref_model_name} -> {path}", flush=True)
    missing = frozenset(i for i in range(num_shards) if i not in done)
    entry = ReferenceBuild(split, tokenized, key, parts, path, len(pair_ids), expected, missing)
    for i in missing:
        if expected[i] == 0:  # no pair falls in it, so no block will ever complete it
            entry._write_shard(i, [schema.REFERENCE_SCHEMA.empty_table()])
    return entry


def _versions() -> dict[str, str]:
    import ray
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "logprob_version": str(entries.LOGPROB_VERSION),
    }
