"""The training table's rows in pair_id order: a merge join of stage 1's and stage 2's sorted files.

    for batch in merge(tokenized, reference, lo, hi):   # the rows with lo <= pair_id < hi, BATCH_ROWS at a time

Both inputs are sorted by pair_id (stage 1 writes sorted files, stage 2 shards of pair_id ranges, each sorted),
so the merge is one streaming pass with memory bounded by a batch, reading only the row groups whose pair_id
statistics meet the range. Rows are matched by pair_id, never by position: a pair missing on either side, or
out of order, is a CacheError.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.cache import storage
from pipeline.data.entries import ReferenceScores, TokenizedData
from pipeline.errors import CacheError

REF_COLUMNS = [n for n in schema.TABLE_SCHEMA.names if n.startswith("ref_")]
BATCH_ROWS = 4096  # rows merged at a time: the merge's memory bound


def table_schema(with_reference: bool) -> pa.Schema:
    """The table's columns: TABLE_SCHEMA, without the ref_* columns for a reference-free run."""
    if with_reference:
        return schema.TABLE_SCHEMA
    return pa.schema([f for f in schema.TABLE_SCHEMA if f.name not in REF_COLUMNS])


def merge(
    tokenized: TokenizedData, reference: ReferenceScores | None, lo: str = "", hi: str | None = None
) -> Iterator[pa.RecordBatch]:
    """Record batches of the training table with lo <= pair_id < hi, in pair_id order: a merge join of two
    sorted streams (the tokenized pairs alone when `reference` is None)."""
    out_schema = table_schema(reference is not None)
    scores = (
        None
        if reference is None
        else _Stream(
            _sorted_batches(reference.files, list(schema.REFERENCE_SCHEMA.names), lo, hi), schema.REFERENCE_SCHEMA
        )
    )
    for tok in _sorted_batches(tokenized.files, list(schema.TOKENIZED_SCHEMA.names), lo, hi):
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


def _sorted_batches(
    files: list[str], columns: list[str], lo: str = "", hi: str | None = None
) -> Iterator[pa.RecordBatch]:
    """Batches of up to BATCH_ROWS rows with lo <= pair_id < hi from files that are each sorted by pair_id and
    cover disjoint ranges, in pair_id order (files ordered by their first pair_id; a file out of order is a
    CacheError). Row groups whose pair_id statistics lie outside the range are not read."""
    fs, paths = storage.parquet_source(files)
    readers = [pq.ParquetFile(p if fs is None else fs.open_input_file(p)) for p in paths]
    heads = [(_first_pair(r), i) for i, r in enumerate(readers) if r.metadata.num_rows]
    last = ""
    for _, i in heapq.nsmallest(len(heads), heads):
        groups = _groups_in_range(readers[i], lo, hi)
        if not groups:
            continue
        for batch in readers[i].iter_batches(batch_size=BATCH_ROWS, columns=columns, row_groups=groups):
            ids = batch.column(schema.PAIR_ID)
            ordered = len(ids) < 2 or pc.all(pc.less(ids[:-1], ids[1:])).as_py()
            if ids[0].as_py() <= last or not ordered:
                raise CacheError(
                    f"{files[i]} is not in pair_id order after the files before it; the entry is "
                    "corrupt. Rerun with --force."
                )
            last = ids[-1].as_py()
            inside = pc.greater_equal(ids, lo)
            if hi is not None:
                inside = pc.and_(inside, pc.less(ids, hi))
            batch = batch.filter(inside)
            if batch.num_rows:
                yield batch


def _groups_in_range(reader: pq.ParquetFile, lo: str, hi: str | None) -> list[int]:
    """The row groups that may hold a pair_id in [lo, hi): all of them where a group has no statistics."""
    column = reader.schema_arrow.get_field_index(schema.PAIR_ID)
    out = []
    for g in range(reader.metadata.num_row_groups):
        stats = reader.metadata.row_group(g).column(column).statistics
        if stats is not None and stats.has_min_max and (stats.max < lo or (hi is not None and stats.min >= hi)):
            continue
        out.append(g)
    return out


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
