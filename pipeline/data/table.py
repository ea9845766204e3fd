"""The training table: stage 1's pairs and stage 2's scores merged in pair_id order into one file per key.

    table = build_table(cfg, tokenized, reference)   # on the driver, once per key (a cache entry); reference
                                                     # None for reference-free losses: no ref_* columns
    pairs = open_table(table)                        # on each worker: memory-mapped, zero-copy

Both inputs are already sorted by pair_id (stage 1 writes sorted files, stage 2 writes shards of pair_id
ranges, each sorted), so the merge is one streaming pass with memory bounded by a batch: no hash join, no
shuffle, nothing in Ray's object store. Rows are matched by pair_id, never by position: a pair missing on
either side, or out of order, is a CacheError.

The file is uncompressed Arrow IPC with token ids as int32 and the sequence lengths the schedule needs. Every
worker of a node memory-maps the same file, so the page cache holds one copy per node and a worker's private
memory does not grow with the number of pairs; a micro-batch reads only its own rows. When `cache_dir` is a
URI, one worker per node copies the file to the node's local cache first (the others wait on a lock).
"""

from __future__ import annotations

import fcntl
import heapq
import io
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.cache import manifests, storage
from pipeline.cache.claims import found_or_claimed
from pipeline.cache.storage import Location
from pipeline.config import Config
from pipeline.core.batching import Schedule
from pipeline.data.entries import TABLE, ReferenceScores, TableEntry, TokenizedData, reusable
from pipeline.data.pairs import PairTable, make_schedule
from pipeline.errors import CacheError

FILE = "pairs.arrow"
LENGTHS = "lengths.npy"  # (n, 2) int32 sequence lengths: what the driver's token-budget schedule reads
LENGTH_COLUMNS = (schema.CHOSEN_LEN, schema.REJECTED_LEN)
REF_COLUMNS = [n for n in schema.TABLE_SCHEMA.names if n.startswith("ref_")]
TABLE_VERSION = 1
BATCH_ROWS = 4096  # rows merged and written at a time: the merge's memory bound


def table_key(tokenized: TokenizedData, reference: ReferenceScores | None) -> str:
    return manifests.cache_key(
        tokenized=tokenized.key, reference=None if reference is None else reference.key, version=TABLE_VERSION
    )


def table_schema(with_reference: bool) -> pa.Schema:
    """The table's columns: TABLE_SCHEMA, without the ref_* columns for a reference-free run."""
    if with_reference:
        return schema.TABLE_SCHEMA
    return pa.schema([f for f in schema.TABLE_SCHEMA if f.name not in REF_COLUMNS])


def build_table(
    cfg: Config, tokenized: TokenizedData, reference: ReferenceScores | None, split: str, verify: bool = False
) -> TableEntry:
    """The training table of these entries: reused when its entry is valid (`verify`: checksums too), else
    merged and written."""
    key = table_key(tokenized, reference)
    path = manifests.entry_dir(cfg.data.cache_dir, TABLE, key)
    label = f"[train] {split}"
    find = partial(reusable, path, key, label, "training table", verify=verify)
    with found_or_claimed(path, label, find) as found:  # None: this job builds it, holding the claim
        if found is not None:
            return TableEntry(path, key, found)
        return _write_table(tokenized, reference, path, key, split)


def _write_table(
    tokenized: TokenizedData, reference: ReferenceScores | None, path: Location, key: str, split: str
) -> TableEntry:
    start = time.time()
    with storage.atomic_target(path, directory=True) as tmp:
        lengths = []
        with (tmp / FILE).open("wb") as sink, pa.ipc.new_file(sink, table_schema(reference is not None)) as writer:
            for batch in merge(tokenized, reference):
                writer.write_batch(batch)
                lengths.append(np.stack([batch.column(c).to_numpy() for c in LENGTH_COLUMNS], axis=1))
        all_lengths = np.concatenate(lengths) if lengths else np.zeros((0, 2), dtype=np.int32)
        rows = len(all_lengths)
        if rows != tokenized.manifest["rows"]:
            raise CacheError(f"{tokenized.path} lists {tokenized.manifest['rows']} pairs but holds {rows}")
        with (tmp / LENGTHS).open("wb") as fh:
            np.save(fh, all_lengths)
    manifest = manifests.write_manifest(
        path,
        key,
        TABLE,
        [FILE, LENGTHS],
        rows=rows,
        inputs={"tokenized": tokenized.key, "reference": None if reference is None else reference.key},
        timings={"merge_s": round(time.time() - start, 2)},
    )
    print(f"[train] {split}: training table of {rows} pairs -> {path} in {time.time() - start:.1f}s", flush=True)
    return TableEntry(path, key, manifest)


def merge(tokenized: TokenizedData, reference: ReferenceScores | None) -> Iterator[pa.RecordBatch]:
    """Record batches of the training table, in pair_id order: a merge join of two sorted streams (the
    tokenized pairs alone when `reference` is None)."""
    out_schema = table_schema(reference is not None)
    scores = (
        None
        if reference is None
        else _Stream(_sorted_batches(reference.files, list(schema.REFERENCE_SCHEMA.names)), schema.REFERENCE_SCHEMA)
    )
    for tok in _sorted_batches(tokenized.files, list(schema.TOKENIZED_SCHEMA.names)):
        columns = {
            **{n: tok.column(n) for n in schema.TOKENIZED_SCHEMA.names if n in out_schema.names},
            schema.CHOSEN_LEN: pc.list_value_length(tok.column(schema.CHOSEN_INPUT_IDS)).cast(pa.int32()),
            schema.REJECTED_LEN: pc.list_value_length(tok.column(schema.REJECTED_INPUT_IDS)).cast(pa.int32()),
        }
        if reference is not None and scores is not None:
            ref = scores.take(tok.num_rows)
            ids = tok.column(schema.PAIR_ID)
            if ref.num_rows != tok.num_rows or not ref.column(schema.PAIR_ID).combine_chunks().equals(ids):
                raise CacheError(
                    f"reference scores in {reference.path} do not cover the tokenized pairs of {tokenized.path} "
                    f"(first pair {ids[0]}); rerun `dpo-pipeline score-ref --force`."
                )
            columns.update({n: ref.column(n).combine_chunks() for n in REF_COLUMNS})
        yield pa.RecordBatch.from_pydict(columns, schema=out_schema)
    if reference is not None and scores is not None and scores.take(1).num_rows:
        raise CacheError(f"reference scores in {reference.path} hold pairs that {tokenized.path} does not")


def training_schedule(cfg: Config, entry: TableEntry) -> Schedule:
    """The run's schedule on the driver, from the entry's row count and (with a token budget) its lengths file:
    the driver never opens the table itself."""
    lengths = None
    if cfg.train.max_tokens_per_batch:
        with (entry.path / LENGTHS).open("rb") as fh:
            lengths = np.load(io.BytesIO(fh.read()))
    return make_schedule(cfg, entry.manifest["rows"], lengths, cfg.scale.num_workers)


def open_table(entry: TableEntry) -> PairTable:
    """The table memory-mapped on this node (fetched once per node first when the cache is a URI)."""
    local = entry.path / FILE if isinstance(entry.path, Path) else _node_copy(entry)
    # the table's buffers point into the map, which stays open as long as they live
    return PairTable(pa.ipc.open_file(pa.memory_map(str(local))).read_all())


def _node_copy(entry: TableEntry) -> Path:
    """A copy of a URI entry's file on this node's disk: the first worker to take the lock copies it, the
    others wait and then map the same copy."""
    remote = entry.path / FILE
    size = entry.manifest["files"][FILE]["bytes"]
    local = storage.local_cache_dir(str(entry.path)) / TABLE / f"{entry.key}.arrow"
    local.parent.mkdir(parents=True, exist_ok=True)
    with open(local.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not (local.is_file() and local.stat().st_size == size):
            with storage.atomic_target(local) as tmp, remote.open("rb") as src, tmp.open("wb") as dst:
                while block := src.read(1 << 24):
                    dst.write(block)
    return local


# --- streaming the inputs in pair_id order ---


def _sorted_batches(files: list[str], columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Batches of BATCH_ROWS rows from files that are each sorted by pair_id and cover disjoint ranges, in
    pair_id order (files ordered by their first pair_id; a file out of order is a CacheError)."""
    fs, paths = storage.parquet_source(files)
    readers = [pq.ParquetFile(p if fs is None else fs.open_input_file(p)) for p in paths]
    heads = [(_first_pair(r), i) for i, r in enumerate(readers) if r.metadata.num_rows]
    last = ""
    for _, i in heapq.nsmallest(len(heads), heads):
        for batch in readers[i].iter_batches(batch_size=BATCH_ROWS, columns=columns):
            ids = batch.column(schema.PAIR_ID)
            ordered = len(ids) < 2 or pc.all(pc.less(ids[:-1], ids[1:])).as_py()
            if ids[0].as_py() <= last or not ordered:
                raise CacheError(
                    f"{files[i]} is not in pair_id order after the files before it; the entry is "
                    "corrupt. Rerun with --force."
                )
            last = ids[-1].as_py()
            yield batch


def _first_pair(reader: pq.ParquetFile) -> str:
    return str(reader.read_row_group(0, columns=[schema.PAIR_ID]).column(0)[0].as_py())


class _Stream:
    """Take exactly n rows at a time from a stream of record batches."""

    def __init__(self, batches: Iterator[pa.RecordBatch], schema: pa.Schema):
        self.batches = batches
        self.schema = schema
        self.buffer: list[pa.RecordBatch] = []
        self.buffered = 0

    def take(self, n: int) -> pa.Table:
        while self.buffered < n and (batch := next(self.batches, None)) is not None:
            self.buffer.append(batch)
            self.buffered += batch.num_rows
        table = pa.Table.from_batches(self.buffer, schema=self.schema)
        head, rest = table.slice(0, n), table.slice(n)
        self.buffer, self.buffered = rest.to_batches(), rest.num_rows
        return head.combine_chunks()
