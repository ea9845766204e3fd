"""Shared storage: `cache_dir`, `output_dir` and `storage_path` as URIs through pyarrow filesystems.

The tests use file:// URIs: they take the RemotePath code path (pyarrow's filesystem API, no rename of
directories), the same one s3:// and gs:// take with another pyarrow filesystem. Nothing on an object store is
committed by a move: the end-to-end test runs the driver on a filesystem that refuses every move.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import fsspec.implementations.local
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.cache import manifests, storage
from pipeline.config import config_from_dict
from pipeline.data.entries import find_reference
from pipeline.errors import CacheError, ConfigError
from stages.stage1_tokenize import run_tokenize
from stages.stage2_score_ref import run_score_ref
from stages.stage3_train import run_train


def uri(p: Path) -> str:
    return f"file://{p}"


def test_remote_path_operations(tmp_path):
    root = storage.location(uri(tmp_path / "r"))
    assert isinstance(root, storage.RemotePath) and str(root) == uri(tmp_path / "r") and not root.exists()
    f = root / "a" / "b.json"
    storage.write_json_atomic(f, {"x": 1})
    assert f.is_file() and json.loads(f.read_text()) == {"x": 1} and f.stat().st_size == len(f.read_bytes())
    assert [p.name for p in (root / "a").iterdir()] == ["b.json"]  # no temporary file left behind
    with storage.atomic_target(root / "entry", directory=True) as tmp:  # on an object store: the entry itself
        assert tmp == root / "entry"
        (tmp / "1.parquet").write_bytes(b"one")
        (tmp / "2.parquet").write_bytes(b"two")
    assert sorted(p.name for p in (root / "entry").iterdir()) == ["1.parquet", "2.parquet"]
    storage.rmtree(root / "entry")
    with pytest.raises(OSError, match="disk gone"), storage.atomic_target(root / "entry", directory=True) as tmp:
        (tmp / "1.parquet").write_bytes(b"one")
        raise OSError("disk gone")
    assert not (root / "entry").exists()  # a failed block leaves nothing behind
    assert not (root / "entry").exists()
    assert isinstance(storage.location("~/x"), Path) and str(storage.location("~/x")) == str(Path("~/x").expanduser())


@pytest.mark.parametrize("remote", [False, True], ids=["local", "object-store"])
def test_a_finished_directory_is_never_replaced(tmp_path, remote):
    """Other jobs may be reading an entry: a directory written over it is refused (StorageError) or, with
    keep_existing, dropped; the entry keeps its files and its manifest, and no temporary is left."""
    root = storage.location(uri(tmp_path / "c")) if remote else tmp_path / "c"
    entry = root / "entry"
    with storage.atomic_target(entry, directory=True) as tmp:
        (tmp / "data.bin").write_bytes(b"old")
    manifests.write_manifest(entry, "k", "test", ["data.bin"], rows=1)
    refused = pytest.raises(storage.StorageError, match="never written over" if remote else "never replaced")
    with refused, storage.atomic_target(entry, directory=True) as tmp:
        (tmp / "data.bin").write_bytes(b"new")
    if remote:  # refused before anything is written, keep_existing too
        with pytest.raises(storage.StorageError), storage.atomic_target(entry, directory=True, keep_existing=True):
            pass
    else:
        with storage.atomic_target(entry, directory=True, keep_existing=True) as tmp:
            (tmp / "data.bin").write_bytes(b"new")
    assert (entry / "data.bin").read_bytes() == b"old" and manifests.read_valid_manifest(entry, "k", "")["rows"] == 1
    assert [p.name for p in root.iterdir()] == ["entry"]


def test_output_mirror_uploads_and_fetches_back(tmp_path):
    target = uri(tmp_path / "out")
    first = storage.LocalMirror(target, fetch=("metrics.jsonl", "tensorboard"))
    (first.local / "metrics.jsonl").write_text('{"step": 1}\n')
    (first.local / "tensorboard").mkdir()
    (first.local / "tensorboard" / "events").write_bytes(b"e")
    first.push()
    assert (tmp_path / "out" / "tensorboard" / "events").read_bytes() == b"e"
    again = storage.LocalMirror(target, fetch=("metrics.jsonl", "tensorboard", "absent"))  # e.g. on another node
    assert again.local != first.local
    assert (again.local / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (again.local / "tensorboard" / "events").read_bytes() == b"e"
    for mirror in (first, again):
        mirror.close()
        assert not mirror.local.exists()
    local = storage.LocalMirror(str(tmp_path / "plain"))
    assert local.local == tmp_path / "plain" and local.remote is None


@pytest.mark.parametrize("key", ["cache_dir", "output_dir", "storage_path"])
def test_uris_with_credentials_or_options_are_refused(key):
    with pytest.raises(ConfigError, match=f"{key}: a URI must not contain credentials") as e:
        config_from_dict({key: "s3://AKIAABCDEFGHIJKLMNOP:wJalrXUtnFEMIK7MDENG@bucket/x"})
    assert "wJalr" not in str(e.value) and "AKIA" not in str(e.value)
    with pytest.raises(ConfigError, match="options in the URI are not supported"):
        config_from_dict({key: "s3://bucket/x?endpoint_override=localhost:9000"})
    assert config_from_dict({key: "gs://bucket/x"}).flat()[key] == "gs://bucket/x"


def test_remote_entry_is_valid_only_after_its_manifest(tmp_path):
    entry = storage.location(uri(tmp_path / "cache")) / "reference" / "k"
    entry.mkdir()
    (entry / "shard-00000.parquet").write_bytes(b"data")
    with pytest.raises(CacheError, match="incomplete"):
        manifests.read_valid_manifest(entry, "k", "")
    manifests.write_manifest(entry, "k", "reference", ["shard-00000.parquet"], rows=1)
    assert manifests.read_valid_manifest(entry, "k", "")["rows"] == 1
    (entry / "shard-00000.parquet").write_bytes(b"dat4")
    with pytest.raises(CacheError, match="fails its checksum"):
        manifests.read_valid_manifest(entry, "k", "", verify=True)  # same size: only --verify reads the bytes


class _NoMoves(fsspec.implementations.local.LocalFileSystem):
    def mv(self, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"moved {args}: an object store has no moves (S3 copies, and refuses above 5 GiB)")


def test_pipeline_on_uris_matches_local_paths(ray_session, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Tokenize, score and train with every location a URI: the same scores as with local paths, the outputs
    in the URI locations, and a second scoring run that reuses the entry. While the driver commits the stage 1
    and 2 entries its URIs open a filesystem that refuses to move anything: each is written in place, its
    manifest last. (The training table's files are written in place by Ray tasks, which this filesystem, a
    test-local class, cannot reach.)"""

    class NoMoveUris:
        @staticmethod
        def from_uri(u: str):
            _, path = pafs.FileSystem.from_uri(u)
            return pafs.PyFileSystem(pafs.FSSpecHandler(_NoMoves())), path

    no_moves = SimpleNamespace(**{**vars(pafs), "FileSystem": NoMoveUris})
    rows = [{"prompt": f"Count {i}:", "chosen": f" {i} {i + 1}", "rejected": f" {i + 2}"} for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {
        "model": str(tiny_model_dir),
        "dataset": [str(tmp_path / "pairs.jsonl")],
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "precompute_ref_batch_size": 1,
        "logging_steps": 1,
        "save_steps": 1,
        "zero_stage": 0,
        "gradient_checkpointing": False,
        "learning_rate": 1e-3,
    }
    local = config_from_dict({**base, "cache_dir": str(tmp_path / "local"), "output_dir": str(tmp_path / "lo")})
    remote = config_from_dict(
        {
            **base,
            "cache_dir": uri(tmp_path / "remote"),
            "output_dir": uri(tmp_path / "ro"),
            "storage_path": uri(tmp_path / "ckpt"),
            "run_name": "uri",
        }
    )

    def scores(ref):
        fs, files = storage.parquet_source(ref.files)
        return pq.ParquetDataset(files, filesystem=fs).read().sort_by("pair_id").to_pylist()

    want = scores(run_score_ref(local, run_tokenize(local, local.data.dataset)))
    with monkeypatch.context() as driver:
        driver.setattr(storage, "pafs", no_moves)
        tok = run_tokenize(remote, remote.data.dataset)
        ref = run_score_ref(remote, tok)
    assert isinstance(ref.path, storage.RemotePath) and str(ref.path).startswith(uri(tmp_path / "remote"))
    assert scores(ref) == want  # micro-batches of one pair: bit-identical
    assert (tmp_path / "remote" / "reference" / ref.key / "manifest.json").is_file()
    assert not list((tmp_path / "remote" / "tokenized").glob(".*"))  # no temporary directory left behind
    capsys.readouterr()
    again = run_score_ref(remote, tok)
    assert "reusing cached reference scores" in capsys.readouterr().out and again.manifest == ref.manifest
    assert find_reference(remote, tok).key == ref.key

    summary = run_train(remote)
    out = tmp_path / "ro"
    assert summary["train_steps"] == 2 and summary["config"]["output_dir"] == uri(out)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "final" / "model.safetensors").is_file() and any((out / "tensorboard").iterdir())
    assert list((tmp_path / "ckpt" / "uri").rglob("state.json"))  # Ray Train checkpoints at storage_path
