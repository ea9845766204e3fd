"""Input preference files: expand paths, fingerprint them, and read their rows with a location each.

Every row comes out as a `RawRow`: the file, the 1-based row (the line for JSON Lines) and either the
record as a JSON string or the reason it could not be read. Parsing and validation happen later, in
parallel, in the tokenization stage.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.cache.fingerprints import file_fingerprints
from pipeline.cache.storage import Location, RemotePath, location
from pipeline.errors import DataError, PipelineError
from pipeline.uris import is_uri

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
BUILTIN_PREFIX = "builtin:"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # OWNER/NAME, as the hub spells a dataset id


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str  # jsonl | json | parquet | arrow_dataset


@dataclass(frozen=True)
class RawRow:
    source: str
    row: int
    record: str | None  # the row as a JSON object string
    error: str | None = None


def expand_inputs(specs: tuple[str, ...] | list[str], cache_dir: str) -> list[InputFile]:
    """Files, globs, directories, save_to_disk directories, one split of a directory or of a hub dataset in the
    local Hugging Face cache (`DIR:SPLIT`, `OWNER/NAME[:SPLIT]`) and builtin names -> an ordered list of files."""
    files: list[InputFile] = []
    for spec in specs:
        files.extend(_expand_one(spec, cache_dir))
    seen: set[str] = set()
    unique = []
    for f in files:
        if f.path not in seen:
            seen.add(f.path)
            unique.append(f)
    return unique


def _expand_one(spec: str, cache_dir: str) -> list[InputFile]:
    if spec.startswith(BUILTIN_PREFIX):  # builtin:NAME or builtin:NAME:PAIRS
        from pipeline.data.demo_data import builtin_dataset_path

        name, _, size = spec[len(BUILTIN_PREFIX) :].partition(":")
        if size and not size.isdigit():
            raise DataError(f"{spec}: the size after the name must be a number of pairs, e.g. builtin:{name}:1000")
        return [InputFile(str(builtin_dataset_path(name, cache_dir, int(size) if size else None)), "jsonl")]
    if is_uri(spec):
        return _uri_files(spec)
    path = Path(spec).expanduser()
    if any(c in spec for c in "*?["):
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise DataError(f"{spec}: no files match this pattern")
        out = []
        for m in matches:
            out.extend(_expand_one(m, cache_dir) if Path(m).is_dir() else [_file(Path(m))])
        return out
    if not path.exists():
        return _split_files(spec, cache_dir)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise DataError(
                f"{spec} is a DatasetDict saved with save_to_disk: name one split, e.g. "
                + " or ".join(str(path / s) for s in splits)
            )
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            return [InputFile(str(path), "arrow_dataset")]
        found = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) is not None)
        if not found:
            raise DataError(f"{spec}: directory holds no {', '.join(FILE_SUFFIXES)} files")
        return [_file(p) for p in found]
    return [_file(path)]


def _uri_files(spec: str) -> list[InputFile]:
    """An object (`s3://bucket/pairs.parquet`), every data file under a prefix (`s3://bucket/pairs/`), or a glob
    (`s3://bucket/pairs/*.jsonl.gz`, `**` for any depth), in name order. Read by the stage's tasks in parallel,
    fingerprinted from their bytes as local files are."""
    glob_at = min((spec.index(c) for c in "*?[" if c in spec), default=None)
    root = location(spec if glob_at is None else spec[:glob_at].rsplit("/", 1)[0])
    if not isinstance(root, RemotePath):  # location() gives a RemotePath for every URI
        raise DataError(f"{spec}: not a URI")
    try:
        if glob_at is None and root.is_file():
            return [_file(root)]
        found = root.fs.get_file_info(pafs.FileSelector(root.path, recursive=True, allow_not_found=True))
    except OSError as e:
        raise DataError(f"{spec}: cannot list it: {e}") from None
    sizes = {f"{root.scheme}{i.path}": i.size for i in found if i.type == pafs.FileType.File}  # no HEAD per object
    names = sorted(sizes)
    if glob_at is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, spec)]
        if not names:
            raise DataError(f"{spec}: no object matches this pattern")
    names = [n for n in names if glob_at is not None or _suffix(Path(n)) is not None]
    if not names:
        raise DataError(f"{spec}: no such object, and no {', '.join(FILE_SUFFIXES)} object under this prefix")
    return [_file(location(n), sizes[n]) for n in names]


def _split_files(spec: str, cache_dir: str) -> list[InputFile]:
    """`DIR:SPLIT`, a hub dataset id `OWNER/NAME` or `OWNER/NAME:SPLIT` (its snapshot in the local Hugging Face
    cache, as for model hub ids: nothing is downloaded): the files of one split, found by the rules `datasets`'
    `load_dataset` uses (`data/train-00000-of-00001.parquet`, `test.jsonl`, a folder named `validation`, ...).
    Without a split, the only one there is."""
    name, _, split = spec.rpartition(":") if ":" in spec else (spec, "", "")
    folder = Path(name).expanduser()
    if not folder.is_dir():
        if not HUB_ID.fullmatch(name) or _suffix(folder) is not None:
            raise DataError(f"{spec}: no such file or directory")
        from pipeline.models.loading import hub_snapshot

        try:
            folder = hub_snapshot(name, "dataset")
        except PipelineError as e:
            raise DataError(f"{spec}: no such file or directory, and {e}") from None
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    except FileNotFoundError:  # datasets' EmptyDatasetError and DataFilesNotFoundError: no data file at all
        found = DataFilesDict()
    splits = {str(k): [Path(f) for f in v if _suffix(Path(f)) is not None] for k, v in found.items()}
    splits = {k: v for k, v in splits.items() if v}
    if not splits:
        raise DataError(f"{spec}: {folder} holds no {', '.join(FILE_SUFFIXES)} files of any split")
    if not split and len(splits) > 1:
        raise DataError(f"{spec} has the splits {', '.join(sorted(splits))}: name one, e.g. {name}:{min(splits)}")
    split = split or next(iter(splits))
    if split not in splits:
        raise DataError(f"{spec}: no split {split!r} in {folder}; it has {', '.join(sorted(splits))}")
    return [_file(f) for f in splits[split]]


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in FILE_SUFFIXES if name.endswith(s)), None)


def _file(path: Location, size: int | None = None) -> InputFile:
    """The input file at `path` (`size`: its size when a listing gave it), refused when unusable."""
    suffix = _suffix(Path(path.name))
    if suffix is None:
        raise DataError(f"{path}: unsupported file type; expected one of {', '.join(FILE_SUFFIXES)}")
    if isinstance(path, Path) and not os.access(path, os.R_OK):
        raise DataError(f"{path}: file is not readable (permission denied)")
    if (path.stat().st_size if size is None else size) == 0:
        raise DataError(f"{path}: file is empty")
    kind = "parquet" if suffix == ".parquet" else suffix.split(".")[1]
    return InputFile(str(path), kind)


def fingerprint_inputs(files: list[InputFile], cache_dir: str | os.PathLike) -> str:
    """Content hash of every input file, in order (paths do not matter, bytes do); file digests are remembered
    under `cache_dir` (pipeline.cache.fingerprints), so unchanged inputs are not read again."""
    labelled: list[tuple[str, Location]] = []
    for f in files:
        paths = (
            [location(f.path)]
            if f.kind != "arrow_dataset"
            else sorted(p for p in Path(f.path).iterdir() if p.suffix in (".arrow", ".json"))
        )
        labelled += [(f"{f.kind}:{p.name if f.kind == 'arrow_dataset' else ''}", p) for p in paths]
    h = hashlib.blake2b(digest_size=16)
    for (label, _), digest in zip(labelled, file_fingerprints([p for _, p in labelled], cache_dir)):
        h.update(f"{label}:{digest}".encode())
    return h.hexdigest()


def read_rows(f: InputFile) -> Iterator[RawRow]:
    """Rows of one input file; problems reading a row become `RawRow.error`, problems with the file raise."""
    readers = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "arrow_dataset": _read_arrow_dataset}
    yield from readers[f.kind](f.path)


@contextlib.contextmanager
def _open_bytes(path: str) -> Iterator[Any]:
    """A binary reader of a local file or an object (a URI), gunzipped for .gz."""
    with io.BufferedReader(location(path).open("rb")) if is_uri(path) else open(path, "rb") as raw:
        yield gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw


def _read_jsonl(path: str) -> Iterator[RawRow]:
    try:
        with _open_bytes(path) as fh:
            for line_no, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield RawRow(path, line_no, None, f"text is not valid UTF-8 (byte {e.start} of the line)")
                    continue
                yield RawRow(path, line_no, text.strip())
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read file: {e}") from None


def _read_json(path: str) -> Iterator[RawRow]:
    try:
        with _open_bytes(path) as fh:
            data = fh.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read file: {e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: text is not valid UTF-8 (byte offset {e.start})") from None
    stripped = text.lstrip()
    if not stripped.startswith("["):  # JSON Lines in a .json file, as `datasets` accepts
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                yield RawRow(path, line_no, line.strip())
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: broken JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    for i, row in enumerate(rows, start=1):
        yield RawRow(path, i, json.dumps(row, ensure_ascii=False))


def _read_parquet(path: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(location(path).open("rb") if is_uri(path) else path)
        row = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                row += 1
                yield RawRow(path, row, json.dumps(record, ensure_ascii=False, default=str))
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on corrupt files
        raise DataError(f"{path}: cannot read Parquet file: {e}") from None


def _read_arrow_dataset(path: str) -> Iterator[RawRow]:
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(path)
    except (OSError, ValueError, FileNotFoundError) as e:
        raise DataError(f"{path}: cannot load save_to_disk dataset: {e}") from None
    for i, record in enumerate(dataset, start=1):
        yield RawRow(path, i, json.dumps(record, ensure_ascii=False, default=str))
