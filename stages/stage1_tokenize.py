"""Stage 1: tokenize preference pairs with Ray Data into a cached Parquet entry.

    dpo-pipeline tokenize --config configs/demo.yaml

Input files are read by Ray tasks (one per file, each row tagged with file and row number), parsed and
tokenized by Ray tasks (a worker process keeps its tokenizer between calls), then checked on the driver:
malformed rows stop the run with their locations, dropped rows are counted by reason, duplicates of a pair
are dropped.
The kept pairs are sorted by pair_id and written under `<cache_dir>/tokenized/<key>/`.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from pipeline import schema
from pipeline.cache import manifests, storage
from pipeline.cache.claims import found_or_claimed
from pipeline.cluster import data_context
from pipeline.config import Config
from pipeline.data.entries import TOKENIZED, TokenizedData, reusable, tokenized_key
from pipeline.data.sources import InputFile, read_rows
from pipeline.data.tokenization import (
    DUPLICATE_PAIR,
    Drop,
    RowError,
    TokenizedPair,
    parse_record,
    row_format,
    tokenize_row,
)
from pipeline.errors import DataError
from pipeline.models.loading import load_tokenizer
from pipeline.progress import Progress

MAX_ERRORS_SHOWN = 10
READ_BATCH_ROWS = 1024
KEPT, DROPPED, ERROR = "kept", "dropped", "error"


# --- Ray user functions: convert a batch, call pipeline/ ---


def _read_files(batch: dict[str, np.ndarray]) -> Iterator[dict[str, list[Any]]]:
    """The rows of each file, READ_BATCH_ROWS at a time: a reader's memory does not grow with the file."""
    for path, kind, file_index in zip(batch["path"], batch["kind"], batch["file_index"]):
        rows = read_rows(InputFile(str(path), str(kind)))
        while chunk := list(itertools.islice(rows, READ_BATCH_ROWS)):
            yield {
                "file_index": [int(file_index)] * len(chunk),
                "source": [r.source for r in chunk],
                "row": [r.row for r in chunk],
                "record": [r.record for r in chunk],
                "error": [r.error or "" for r in chunk],
            }


# Tokenizing runs as Ray tasks rather than an actor pool: a worker process keeps its tokenizer (and its progress
# line) from call to call, so the eval split and the stage's later Ray Data executions run on warm workers
# instead of each starting an actor process that imports the stack and loads the tokenizer again.


@functools.lru_cache(maxsize=1)
def _worker_tokenizer(model_dir: str, trust_remote_code: bool) -> Any:
    return load_tokenizer(model_dir, trust_remote_code)


_worker_progress: dict[str, Progress] = {}  # one line per worker and split (the stage materializes its output:
# the driver sees no rows until the end)


def _tokenize_rows(
    batch: dict[str, np.ndarray],
    split: str,
    model_dir: str,
    trust_remote_code: bool,
    max_length: int | None,
    truncation_mode: str,
) -> dict[str, Any]:
    tokenizer = _worker_tokenizer(model_dir, trust_remote_code)
    out: dict[str, list[Any]] = {
        k: [] for k in ("status", "detail", "fmt", "prompt_merged", *schema.TOKENIZED_SCHEMA.names)
    }
    for record, read_error in zip(batch["record"], batch["error"]):
        status, detail, fmt, result = ERROR, None, "", None
        try:
            if read_error:
                raise RowError(str(read_error))
            row = parse_record(record)
            fmt = row_format(row)
            result = tokenize_row(row, tokenizer, max_length, truncation_mode)
            status, detail = (DROPPED, result.reason) if isinstance(result, Drop) else (KEPT, None)
        except RowError as e:
            detail = str(e)
        kept = status == KEPT
        out["status"].append(status)
        out["detail"].append(detail)
        out["fmt"].append(fmt)
        out["prompt_merged"].append(isinstance(result, TokenizedPair) and result.prompt_merged)
        for name in schema.TOKENIZED_SCHEMA.names:
            default: Any = "" if name == schema.PAIR_ID else [] if name.endswith("_ids") else 0
            out[name].append(getattr(result, name) if kept else default)
    out["truncated"] = [bool(t) for t in out["truncated"]]
    label = f"[tokenize] {split}: worker {os.getpid()}"
    _worker_progress.setdefault(label, Progress(label, None, "rows")).add(len(batch["record"]))
    return {**out, "file_index": batch["file_index"], "source": batch["source"], "row": batch["row"]}


# --- the stage ---


def run_tokenize(
    cfg: Config, specs: tuple[str, ...], split: str = "train", force: bool = False, verify: bool = False
) -> TokenizedData:
    key, files, model_dir, parts = tokenized_key(cfg, specs)
    path = manifests.entry_dir(cfg.data.cache_dir, TOKENIZED, key)
    label = f"[tokenize] {split}"
    find = functools.partial(reusable, path, key, label, "tokenized data", verify=verify)
    with found_or_claimed(path, label, find, force) as found:  # None: this job builds it, holding the claim
        if found is not None:
            return TokenizedData(path, key, found)
        return _tokenize(cfg, files, model_dir, parts, path, key, split)


def _tokenize(
    cfg: Config,
    files: list[InputFile],
    model_dir: str,
    parts: dict[str, Any],
    path: storage.Location,
    key: str,
    split: str,
) -> TokenizedData:
    start = time.time()
    print(f"[tokenize] {split}: {len(files)} file(s) -> {path}", flush=True)
    items = [{"path": f.path, "kind": f.kind, "file_index": i} for i, f in enumerate(files)]
    data_context()
    # light (never waits behind the tokenizers); one file per call, its rows yielded in bounded batches
    rows = ray.data.from_items(items).map_batches(_read_files, batch_size=1, num_cpus=0)
    tokenized = rows.map_batches(
        _tokenize_rows,  # type: ignore[arg-type]  # Ray's stubs do not know fn_kwargs
        fn_kwargs={
            "split": split,
            "model_dir": model_dir,
            "trust_remote_code": cfg.model.trust_remote_code,
            "max_length": cfg.data.max_length,
            "truncation_mode": cfg.data.truncation_mode,
        },
        batch_size=256,
    ).materialize()

    summary = tokenized.select_columns(
        ["status", "detail", "fmt", "source", "row", "file_index", "pair_id", "truncated", "prompt_merged"]
    ).to_pandas()
    summary = summary.sort_values(["file_index", "row"], kind="stable")
    _raise_on_errors(summary)
    dup = summary[summary.status == KEPT].duplicated("pair_id", keep="first")
    duplicate_rows = set(zip(summary[summary.status == KEPT][dup].file_index, summary[summary.status == KEPT][dup].row))
    report = _report(summary, len(duplicate_rows), split)

    kept = tokenized.map_batches(_keep_unique, fn_kwargs={"duplicates": duplicate_rows}, batch_format="pyarrow")
    with storage.atomic_target(path, directory=True) as tmp:
        kept.sort(schema.PAIR_ID).write_parquet(str(tmp))
        names = sorted(p.name for p in tmp.iterdir() if p.name.endswith(".parquet"))
    manifest = manifests.write_manifest(
        path,
        key,
        TOKENIZED,
        names,
        rows=report["pairs_kept"],
        inputs=parts,
        sources=[f.path for f in files],
        report=report,
        timings={"tokenize_s": round(time.time() - start, 2)},
    )
    elapsed = time.time() - start
    print(
        f"[tokenize] {split}: {_summary_line(report)} in {elapsed:.1f}s ({report['rows_read'] / elapsed:.0f} rows/s)",
        flush=True,
    )
    if report["prompt_boundary_merged"]:
        print(
            f"[tokenize] warning: in {report['prompt_boundary_merged']} pair(s) the tokenized prompt is not a "
            "prefix of prompt+completion (the chat template renders the prompt differently, or tokens merge "
            "across the boundary); their completion starts where the two diverge, as in TRL.",
            flush=True,
        )
    return TokenizedData(path, key, manifest)


def _keep_unique(batch: pa.Table, duplicates: set[tuple[int, int]]) -> pa.Table:
    status = batch.column("status").to_pylist()
    where = zip(batch.column("file_index").to_pylist(), batch.column("row").to_pylist())
    mask = [s == KEPT and w not in duplicates for s, w in zip(status, where)]
    return batch.filter(pa.array(mask)).select(schema.TOKENIZED_SCHEMA.names).cast(schema.TOKENIZED_SCHEMA)


def _raise_on_errors(summary: Any) -> None:
    errors = summary[summary.status == ERROR]
    formats = summary[summary.fmt != ""].fmt
    if len(errors):
        lines = [f"  {r.source}, row {r.row}: {r.detail}" for r in errors.head(MAX_ERRORS_SHOWN).itertuples()]
        more = len(errors) - MAX_ERRORS_SHOWN
        raise DataError(
            f"{len(errors)} malformed row(s) in the input; fix them and rerun:\n"
            + "\n".join(lines)
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
    if formats.nunique() > 1:
        minority = formats.value_counts().idxmin()
        first = summary[summary.fmt == minority].iloc[0]
        raise DataError(
            f"the input mixes standard (text) and conversational (message list) rows: "
            f"{first.source}, row {first.row} is {minority} while most rows are not. Use one format."
        )


def _report(summary: Any, duplicates: int, split: str) -> dict[str, Any]:
    dropped = summary[summary.status == DROPPED].detail.value_counts().to_dict()
    if duplicates:
        dropped[DUPLICATE_PAIR] = duplicates
    kept = int((summary.status == KEPT).sum()) - duplicates
    return {
        "split": split,
        "rows_read": len(summary),
        "pairs_kept": kept,
        "dropped": {str(k): int(v) for k, v in sorted(dropped.items())},
        "truncated_pairs": int(summary.truncated.sum()),
        "prompt_boundary_merged": int(summary.prompt_merged.sum()),
        "format": summary[summary.status == KEPT].fmt.iloc[0] if kept else None,
    }


def _summary_line(report: dict[str, Any]) -> str:
    dropped = ", ".join(f"{n} {reason}" for reason, n in report["dropped"].items()) or "none"
    return (
        f"{report['rows_read']} rows read, {report['pairs_kept']} pairs kept, dropped: {dropped}; "
        f"{report['truncated_pairs']} truncated to max_length"
    )
