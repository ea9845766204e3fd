"""The run directory (`output_dir`): the names of what a run writes there, their readers, and `load_run`,
which reads a whole run back for the report.

    <output_dir>/metrics.jsonl          one JSON line per logging step; eval lines carry eval_-prefixed keys
    <output_dir>/train_summary.json     throughput, memory, the effective config, the cache entries used
    <output_dir>/data_report.json       rows read, kept and dropped by reason (eval_data_report.json for eval)
    <output_dir>/report.md, plots/      `dpo-pipeline report`
    <output_dir>/tensorboard/, final/   TensorBoard events; the trained model (HF format)

`output_dir` may be a local path or a URI (pipeline.cache.storage): every reader here goes through `location`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import schema
from pipeline.cache.manifests import MANIFEST
from pipeline.cache.storage import Location, location, parquet_source, write_json_atomic
from pipeline.config import Config, config_from_dict
from pipeline.errors import PipelineError
from pipeline.uris import is_uri

if TYPE_CHECKING:
    from pipeline.data.entries import TokenizedData

METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"
REPORT = "report.md"
PLOTS = "plots"
TENSORBOARD = "tensorboard"
FINAL = "final"
GENERATIONS_FILE = "generations.jsonl"  # stage 4: every eval prompt's completions, before and after
GENERATION_SUMMARY = "generation_summary.json"
DATA_REPORTS = {"train": "data_report.json", "eval": "eval_data_report.json"}
EVAL_PREFIX = "eval_"


def is_eval(record: dict[str, Any]) -> bool:
    """An eval line of metrics.jsonl (its metrics are eval_-prefixed), as opposed to a training step's."""
    return f"{EVAL_PREFIX}loss" in record


def read_metrics(run_dir: str | Location) -> list[dict[str, Any]]:
    """Every line of metrics.jsonl, in order; PipelineError naming the line that is not JSON."""
    path = _dir(run_dir) / METRICS
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}, line {n}: not JSON ({e.msg})") from None
    return records


def first_eval(run_dir: str | Location) -> dict[str, Any]:
    """The first eval line (step 0 of a fresh run)."""
    for record in read_metrics(run_dir):
        if is_eval(record):
            return record
    raise PipelineError(f"no eval line in {_dir(run_dir) / METRICS}")


def read_json(run_dir: str | Location, name: str) -> dict[str, Any] | None:
    """A JSON file of the run directory, None when it is not there (yet)."""
    path = _dir(run_dir) / name
    return json.loads(path.read_text()) if path.is_file() else None


# --- a finished (or running) run, read back for the report ---


@dataclass(frozen=True)
class RunData:
    dir: Location
    train: list[dict[str, Any]]  # metrics.jsonl training lines
    evals: list[dict[str, Any]]  # eval lines, keys without the eval_ prefix
    summary: dict[str, Any] | None
    data_reports: dict[str, dict[str, Any]]  # split -> data report
    ref_margins: dict[str, np.ndarray]  # split -> reference log-prob margins, one per pair
    ref_notes: dict[str, str]  # split -> why its margins are missing
    generation_summary: dict[str, Any] | None = None  # stage 4's totals
    generations: list[dict[str, Any]] = field(default_factory=list)  # stage 4's records, one per eval prompt

    @property
    def config(self) -> dict[str, Any]:
        """The effective config as recorded (flat keys, secrets redacted); {} before the run has finished."""
        return dict((self.summary or {}).get("config", {}))

    @property
    def cfg(self) -> Config | None:
        """The recorded config as a Config; None when there is none, or it is from a version with other keys."""
        try:
            return config_from_dict(self.config) if self.config else None
        except PipelineError:
            return None


def load_run(run_dir: str) -> RunData:
    """Read a run directory (a local path or a URI); PipelineError if it is not one."""
    d = location(run_dir if is_uri(run_dir) else str(Path(run_dir).expanduser().resolve()))
    if not d.is_dir():
        raise PipelineError(f"{run_dir}: no such directory")
    if not (d / METRICS).is_file():
        raise PipelineError(
            f"{run_dir} is not a run directory: {METRICS} is missing (`dpo-pipeline train` writes it into output_dir)"
        )
    train, evals = [], []
    for record in read_metrics(d):
        if is_eval(record):
            evals.append({k.removeprefix("eval_"): v for k, v in record.items()})
        elif "loss" in record:
            train.append(record)
    if not train:
        raise PipelineError(f"{d / METRICS} has no training step yet: nothing to report")
    summary = read_json(d, SUMMARY)
    data_reports = {split: r for split, name in DATA_REPORTS.items() if (r := read_json(d, name)) is not None}
    margins, notes = _reference_margins((summary or {}).get("inputs"))
    generated = d / GENERATIONS_FILE
    records = [json.loads(line) for line in generated.read_text().splitlines()] if generated.is_file() else []
    return RunData(d, train, evals, summary, data_reports, margins, notes, read_json(d, GENERATION_SUMMARY), records)


def _reference_margins(inputs: dict[str, Any] | None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """ref_chosen_logps − ref_rejected_logps of every pair, from the cache entries the run used."""
    if not inputs:
        return {}, {"train": f"the cache entries used are not recorded in {SUMMARY}"}
    import pyarrow.parquet as pq

    margins, notes = {}, {}
    for split in splits(inputs):
        if inputs[split].get("reference") is None:
            notes[split] = "the losses are reference-free: no reference was scored"
            continue
        path = location(inputs[split]["reference"])
        manifest = read_json(path, MANIFEST)
        if manifest is None:
            notes[split] = f"the reference cache entry {path} no longer exists"
            continue
        fs, files = parquet_source([str(path / f) for f in sorted(manifest["files"])])
        table = pq.ParquetDataset(files, filesystem=fs).read(
            columns=[schema.REF_CHOSEN_LOGPS, schema.REF_REJECTED_LOGPS]
        )
        margins[split] = (
            table.column(schema.REF_CHOSEN_LOGPS).to_numpy() - table.column(schema.REF_REJECTED_LOGPS).to_numpy()
        )
    return margins, notes


def splits(per_split: dict[str, Any]) -> list[str]:
    """Split names, train first (train_summary.json stores its keys sorted)."""
    return sorted(per_split, key=lambda split: (split != "train", split))


def write_data_report(output_dir: str, data: TokenizedData, split: str) -> Location:
    """`data_report.json` (train) or `eval_data_report.json`: rows read, kept, dropped by reason."""
    out = location(output_dir) / DATA_REPORTS[split]
    write_json_atomic(out, {**data.report, "split": split, "tokenized_path": str(data.path)})
    return out


def _dir(run_dir: str | Location) -> Location:
    return location(run_dir) if isinstance(run_dir, str) else run_dir
