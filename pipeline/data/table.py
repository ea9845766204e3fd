"""The training table: stage 1's pairs and stage 2's scores merged in pair_id order into Arrow files per key.

    table = build_table(cfg, tokenized, reference)   # on the driver, once per key (a cache entry); reference
                                                     # None for reference-free losses: no ref_* columns
    pairs = open_table(table)                        # on each worker: memory-mapped, zero-copy

The rows come from `pipeline.data.merge`: a streaming merge join of the two sorted inputs, memory bounded by a
batch, no hash join, no shuffle, nothing in Ray's object store. The merge runs as Ray tasks, one per range of
the pair_id hash space (as many ranges as the table needs for files of at most SHARD_BYTES, estimated from
stage 1's files), each reading only the row groups of its range and writing its own files into the entry
directory — in place on an object store, where the manifest, written last by the driver, commits the entry
(S3 copies no object above 5 GiB, so nothing there is moved).

The files are uncompressed Arrow IPC with token ids as int32 and the sequence lengths the schedule needs; file
names sort in pair_id order. Every worker of a node memory-maps the same files, so the page cache holds one copy
per node and a worker's private memory does not grow with the number of pairs; a micro-batch reads only its own
rows. When `cache_dir` is a URI, one worker per node copies the files to the node's local cache first (the
others wait on a lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import math
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline import schema
from pipeline.cache import manifests, storage
from pipeline.cache.claims import found_or_claimed
from pipeline.cache.storage import Location
from pipeline.config import Config
from pipeline.core.batching import Schedule
from pipeline.data.entries import TABLE, ReferenceScores, TableEntry, TokenizedData, reusable
from pipeline.data.merge import REF_COLUMNS, merge, table_schema
from pipeline.data.pairs import PairTable, make_schedule
from pipeline.errors import CacheError

LENGTHS = "lengths.npy"  # (n, 2) int32 sequence lengths: what the driver's token-budget schedule reads
LENGTH_COLUMNS = (schema.CHOSEN_LEN, schema.REJECTED_LEN)
TABLE_VERSION = 2  # 1: one pairs.arrow written by the driver
SHARD_BYTES = 1 << 30  # the largest table file (an object store copies up to 5 GiB in one request)
ESTIMATE_MARGIN = 1.25  # ranges of equal width in the hash space hold about equal bytes, not exactly
PAIR_ID_SPACE = 1 << 32  # ranges are cut on the first 8 hex digits of the pair_id, as reference shards are


def shard_file(index: int, part: int) -> str:
    """A table file's name: range `index`, its `part`-th file; the names sort in pair_id order."""
    return f"pairs-{index:05d}-{part:03d}.arrow"


def table_key(tokenized: TokenizedData, reference: ReferenceScores | None) -> str:
    return manifests.cache_key(
        tokenized=tokenized.key, reference=None if reference is None else reference.key, version=TABLE_VERSION
    )


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
    ranges = pair_id_ranges(_estimated_bytes(tokenized, reference), SHARD_BYTES)
    with storage.atomic_target(path, directory=True) as tmp:
        write = ray.remote(_write_range)
        done = ray.get(
            [write.remote(tokenized, reference, tmp, i, lo, hi, SHARD_BYTES) for i, (lo, hi) in enumerate(ranges)]
        )
        names = [name for files, _ in done for name in files]
        all_lengths = np.concatenate([lengths for _, lengths in done])
        rows = len(all_lengths)
        if rows != tokenized.manifest["rows"]:
            raise CacheError(f"{tokenized.path} lists {tokenized.manifest['rows']} pairs but holds {rows}")
        with (tmp / LENGTHS).open("wb") as fh:
            np.save(fh, all_lengths)
    manifest = manifests.write_manifest(
        path,
        key,
        TABLE,
        [*names, LENGTHS],
        rows=rows,
        inputs={"tokenized": tokenized.key, "reference": None if reference is None else reference.key},
        timings={"merge_s": round(time.time() - start, 2)},
    )
    print(
        f"[train] {split}: training table of {rows} pairs in {len(names)} file(s) -> {path} in "
        f"{time.time() - start:.1f}s",
        flush=True,
    )
    return TableEntry(path, key, manifest)


def pair_id_ranges(estimated_bytes: int, shard_bytes: int) -> list[tuple[str, str | None]]:
    """[lo, hi) bounds on pair_ids (hex prefixes; hi None: no upper bound) cutting the hash space into equal
    ranges, as many as files of `shard_bytes` need with a margin."""
    n = max(1, math.ceil(ESTIMATE_MARGIN * estimated_bytes / shard_bytes))
    cuts = [f"{i * PAIR_ID_SPACE // n:08x}" for i in range(n)]
    return [(lo, hi) for lo, hi in zip(cuts, [*cuts[1:], None])]


def _estimated_bytes(tokenized: TokenizedData, reference: ReferenceScores | None) -> int:
    """The table's size, about: stage 1's files uncompressed (their row groups' sizes), plus the scores."""
    fs, paths = storage.parquet_source(tokenized.files)
    readers = [pq.ParquetFile(p if fs is None else fs.open_input_file(p)) for p in paths]
    data = sum(r.metadata.row_group(g).total_byte_size for r in readers for g in range(r.metadata.num_row_groups))
    return int(data + (0 if reference is None else 8 * len(REF_COLUMNS) * tokenized.manifest["rows"]))


def _write_range(
    tokenized: TokenizedData,
    reference: ReferenceScores | None,
    directory: Location,
    index: int,
    lo: str,
    hi: str | None,
    shard_bytes: int,
) -> tuple[list[str], np.ndarray]:
    """The table's rows with lo <= pair_id < hi, written as files of at most `shard_bytes` (a Ray task): their
    names, and the rows' (n, 2) sequence lengths."""
    names: list[str] = []
    lengths = [np.zeros((0, 2), dtype=np.int32)]
    out_schema = table_schema(reference is not None)
    footer = 4096 + shard_bytes // 100  # kept free for the file's footer: the schema and an entry per batch
    with contextlib.ExitStack() as files:
        writer, sink = None, None
        for batch in merge(tokenized, reference, lo, hi):
            for piece in _pieces(batch, max(1, shard_bytes // 4)):
                if sink is not None and sink.tell() + pa.ipc.get_record_batch_size(piece) + footer > shard_bytes:
                    files.close()
                    writer, sink = None, None
                if writer is None:
                    names.append(shard_file(index, len(names)))
                    sink = files.enter_context((directory / names[-1]).open("wb"))
                    writer = files.enter_context(pa.ipc.new_file(sink, out_schema))
                writer.write_batch(piece)
                lengths.append(np.stack([piece.column(c).to_numpy() for c in LENGTH_COLUMNS], axis=1))
    return names, np.concatenate(lengths)


def _pieces(batch: pa.RecordBatch, max_bytes: int) -> Iterator[pa.RecordBatch]:
    """`batch` in row slices of at most about `max_bytes` each (a batch of long sequences can be gigabytes)."""
    rows = max(1, int(batch.num_rows * max_bytes / max(batch.nbytes, 1)))
    for start in range(0, batch.num_rows, rows):
        yield batch.slice(start, rows)


def training_schedule(cfg: Config, entry: TableEntry) -> Schedule:
    """The run's schedule on the driver, from the entry's row count and (with a token budget) its lengths file:
    the driver never opens the table itself."""
    lengths = None
    if cfg.train.max_tokens_per_batch:
        with (entry.path / LENGTHS).open("rb") as fh:
            lengths = np.load(io.BytesIO(fh.read()))
    return make_schedule(cfg, entry.manifest["rows"], lengths, cfg.scale.data_parallel_size)


def open_table(entry: TableEntry) -> PairTable:
    """The table memory-mapped on this node (fetched once per node first when the cache is a URI)."""
    names = sorted(n for n in entry.manifest["files"] if n.endswith(".arrow"))
    local = entry.path if isinstance(entry.path, Path) else _node_copy(entry, names)
    # the table's buffers point into the maps, which stay open as long as they live
    parts = [pa.ipc.open_file(pa.memory_map(str(local / name))).read_all() for name in names]
    if not parts:  # no pair at all
        return PairTable(table_schema(entry.manifest["inputs"]["reference"] is not None).empty_table())
    return PairTable(pa.concat_tables(parts))


def _node_copy(entry: TableEntry, names: list[str]) -> Path:
    """A copy of a URI entry's files on this node's disk: the first worker to take the lock copies them, the
    others wait and then map the same copy."""
    local = storage.local_cache_dir(str(entry.path)) / TABLE / entry.key
    local.mkdir(parents=True, exist_ok=True)
    with open(local.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        for name in names:
            size = entry.manifest["files"][name]["bytes"]
            if (local / name).is_file() and (local / name).stat().st_size == size:
                continue
            copy = storage.atomic_target(local / name)
            with copy as tmp, (entry.path / name).open("rb") as src, tmp.open("wb") as dst:
                while block := src.read(1 << 24):
                    dst.write(block)
    return local
