"""Input expansion and row reading: every supported form, and a clear error for each unusable one."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.sources import expand_inputs, fingerprint_inputs, read_rows
from pipeline.errors import DataError

ROWS = [{"prompt": "q1", "chosen": "a", "rejected": "b"}, {"prompt": "q2", "chosen": "c", "rejected": "d"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_all(files):
    return [(r.row, json.loads(r.record) if r.record else None, r.error) for f in files for r in read_rows(f)]


def test_every_file_form(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    (tmp_path / "c.json").write_text(json.dumps(ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    files = expand_inputs([str(tmp_path)], str(tmp_path))
    assert [f.kind for f in files] == ["jsonl", "jsonl", "json", "parquet"]
    rows = read_all(files)
    assert [r[1] for r in rows] == ROWS * 4
    assert [r[0] for r in rows] == [1, 2, 1, 3, 1, 2, 1, 2]  # gz: the blank line 2 is skipped, rows keep line numbers


def test_glob_and_dedup(tmp_path):
    write_jsonl(tmp_path / "x1.jsonl", ROWS)
    write_jsonl(tmp_path / "x2.jsonl", ROWS)
    files = expand_inputs([str(tmp_path / "x*.jsonl"), str(tmp_path / "x1.jsonl")], str(tmp_path))
    assert [f.path.rsplit("/", 1)[1] for f in files] == ["x1.jsonl", "x2.jsonl"]


def test_save_to_disk_dataset_and_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(tmp_path / "ds")
    files = expand_inputs([str(tmp_path / "ds")], str(tmp_path))
    assert files[0].kind == "arrow_dataset"
    assert [r[1] for r in read_all(files)] == ROWS
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataError, match=r"DatasetDict saved with save_to_disk: name one split, e.g. .*dd/train"):
        expand_inputs([str(tmp_path / "dd")], str(tmp_path))


def _make(path, kind):
    if kind == "empty":
        (path / "empty.jsonl").write_text("")
        return path / "empty.jsonl"
    if kind == "csv":
        (path / "data.csv").write_text("a,b\n")
        return path / "data.csv"
    if kind == "empty_dir":
        (path / "sub").mkdir()
        return path / "sub"
    return path / {"missing": "missing.jsonl", "glob": "nothing*.jsonl"}[kind]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no such file or directory"),
        ("empty", "file is empty"),
        ("csv", "unsupported file type"),
        ("empty_dir", "directory holds no"),
        ("glob", "no files match this pattern"),
    ],
)
def test_unusable_inputs(tmp_path, kind, message):
    with pytest.raises(DataError, match=message):
        expand_inputs([str(_make(tmp_path, kind))], str(tmp_path))


def test_row_level_problems_keep_their_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"chosen": "a", "rejected": "b"}\n{"chosen": "\xff\xfe"}\n{"chosen": \n')
    rows = list(read_rows(expand_inputs([str(path)], str(tmp_path))[0]))
    assert rows[1].row == 2 and "not valid UTF-8" in rows[1].error
    assert rows[2].row == 3 and rows[2].record == '{"chosen":'  # parsed (and refused) later, in parallel


def test_broken_json_array_and_corrupt_parquet(tmp_path):
    (tmp_path / "a.json").write_text('[{"chosen": "a"},\n {"chosen": }]')
    with pytest.raises(DataError, match="broken JSON at line 2"):
        list(read_rows(expand_inputs([str(tmp_path / "a.json")], str(tmp_path))[0]))
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match="cannot read Parquet file"):
        list(read_rows(expand_inputs([str(tmp_path / "b.parquet")], str(tmp_path))[0]))


def test_fingerprint_follows_content_not_path(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    shutil.copy(a, tmp_path / "copy.jsonl")
    fp = fingerprint_inputs(expand_inputs([str(a)], str(tmp_path)), tmp_path)
    assert fp == fingerprint_inputs(expand_inputs([str(tmp_path / "copy.jsonl")], str(tmp_path)), tmp_path)
    write_jsonl(a, ROWS[:1])
    assert fp != fingerprint_inputs(expand_inputs([str(a)], str(tmp_path)), tmp_path)


def test_builtin_names_and_sizes(tmp_path):
    (full,) = expand_inputs(["builtin:demo-test-text"], str(tmp_path))
    (small,) = expand_inputs(["builtin:demo-test-text:40"], str(tmp_path))
    assert len(Path(full.path).read_text().splitlines()) == 300
    assert len(Path(small.path).read_text().splitlines()) == 40
    rows = [json.loads(r.record) for r in read_rows(small)]
    assert all(isinstance(r["prompt"], str) and r["chosen"] != r["rejected"] for r in rows)
    with pytest.raises(DataError, match="must be a number of pairs"):
        expand_inputs(["builtin:demo-test:many"], str(tmp_path))


# --- one split of a folder, or of a hub dataset in the local Hugging Face cache ---


def fake_hub_dataset(hub: Path, repo_id: str, files: dict[str, list[dict]]) -> Path:
    """A dataset snapshot laid out as `hf download --repo-type dataset` leaves it in HF_HUB_CACHE: refs/main names
    a commit whose folder holds the files (Parquet or JSON Lines by suffix)."""
    commit = "3f2c" * 10
    repo = hub / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for rel, rows in files.items():
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(rows), snapshot / rel)
        else:
            write_jsonl(snapshot / rel, rows)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_dataset_id_reads_one_split_of_its_local_snapshot(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = fake_hub_dataset(
        tmp_path / "hub",
        "org/prefs",
        {
            "data/train-00000-of-00002.parquet": ROWS[:1],
            "data/train-00001-of-00002.parquet": ROWS[1:],
            "data/test-00000-of-00001.parquet": ROWS[::-1],
            "README.md": [],
        },
    )
    train = expand_inputs(["org/prefs:train"], str(tmp_path))
    assert [Path(f.path) for f in train] == [snapshot / f"data/train-0000{i}-of-00002.parquet" for i in (0, 1)]
    assert read_all(train) == [(1, ROWS[0], None), (1, ROWS[1], None)]
    assert read_all(expand_inputs(["org/prefs:test"], str(tmp_path))) == [(1, ROWS[1], None), (2, ROWS[0], None)]
    with pytest.raises(DataError, match=r"^org/prefs has the splits test, train: name one, e.g. org/prefs:test$"):
        expand_inputs(["org/prefs"], str(tmp_path))
    with pytest.raises(DataError, match=r"^org/prefs:dev: no split 'dev' in .*; it has test, train$"):
        expand_inputs(["org/prefs:dev"], str(tmp_path))
    with pytest.raises(DataError, match=r"^org/absent:train: no such file or directory, and dataset org/absent: no "):
        expand_inputs(["org/absent:train"], str(tmp_path))
    with pytest.raises(DataError, match="hf download org/absent --repo-type dataset"):
        expand_inputs(["org/absent"], str(tmp_path))
    with pytest.raises(DataError, match=r"^data/missing.jsonl: no such file or directory$"):  # a path, not a hub id
        expand_inputs(["data/missing.jsonl"], str(tmp_path))


def test_a_folder_takes_a_split_too(tmp_path):
    (tmp_path / "prefs").mkdir()
    write_jsonl(tmp_path / "prefs" / "validation.jsonl", ROWS)
    write_jsonl(tmp_path / "prefs" / "train.jsonl", ROWS[:1])
    split = expand_inputs([f"{tmp_path / 'prefs'}:validation"], str(tmp_path))
    assert read_all(split) == [(1, ROWS[0], None), (2, ROWS[1], None)]
    assert len(expand_inputs([str(tmp_path / "prefs")], str(tmp_path))) == 2  # no split: every file, as before


# --- objects on a store (file:// takes the same pyarrow filesystem path as s3:// and gs://) ---


def test_uri_objects_prefixes_and_globs_read_and_fingerprint_as_local_files(tmp_path):
    root = tmp_path / "bucket" / "pairs"
    (root / "2026").mkdir(parents=True)
    write_jsonl(root / "a.jsonl", ROWS)
    with gzip.open(root / "2026" / "b.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in ROWS[::-1]))
    pq.write_table(pa.Table.from_pylist(ROWS), root / "2026" / "c.parquet")
    (root / "notes.txt").write_text("not data")
    uri = f"file://{root}"

    one = expand_inputs([f"{uri}/a.jsonl"], str(tmp_path))
    assert [(f.path, f.kind) for f in one] == [(f"{uri}/a.jsonl", "jsonl")]
    prefix = expand_inputs([uri], str(tmp_path))  # every data file under it, in name order; notes.txt is not one
    assert [f.path for f in prefix] == [f"{uri}/2026/b.jsonl.gz", f"{uri}/2026/c.parquet", f"{uri}/a.jsonl"]
    assert [f.path for f in expand_inputs([f"{uri}/**/*.parquet"], str(tmp_path))] == [f"{uri}/2026/c.parquet"]
    local = expand_inputs([str(root / n) for n in ("2026/b.jsonl.gz", "2026/c.parquet", "a.jsonl")], str(tmp_path))
    rows = [(r, record) for r, record, _ in read_all(prefix)]
    assert rows == [(r, record) for r, record, _ in read_all(local)]
    assert [record for _, record in rows] == ROWS[::-1] + ROWS + ROWS
    assert fingerprint_inputs(prefix, str(tmp_path / "c1")) == fingerprint_inputs(local, str(tmp_path / "c2"))

    with pytest.raises(DataError, match=r"pairs/nothing: no such object, and no .* object under this prefix"):
        expand_inputs([f"{uri}/nothing"], str(tmp_path))
    with pytest.raises(DataError, match="no object matches this pattern"):
        expand_inputs([f"{uri}/*.csv"], str(tmp_path))
    with pytest.raises(DataError, match="unsupported file type"):
        expand_inputs([f"{uri}/notes.txt"], str(tmp_path))
