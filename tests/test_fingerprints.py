"""File fingerprints computed once and remembered (pipeline.cache.fingerprints), lookups that check sizes only unless
--verify, and hub ids fingerprinted by their local snapshot.

Bytes read are measured with /proc/self/io `rchar` (every byte a read call returned, page cache or not) in fresh
subprocesses, so that only the memo on disk can spare a read. Test files are dated hours back, as real weights
are: a file modified within the last fingerprints.RACY_NS is hashed every time and never remembered.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fingerprint_probe import rchar

from pipeline.cache import fingerprints, manifests, storage
from pipeline.cache.fingerprints import MEMO_FILE, content_digest, file_fingerprints
from pipeline.errors import CacheError
from pipeline.models.loading import weights_fingerprint
from stages.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
BIG_MB = 300


def probe(*args: str, **env: str) -> dict:
    """Run tests/fingerprint_probe.py in a new process (its docstring lists the probes); its JSON answer."""
    argv = [sys.executable, str(Path(__file__).with_name("fingerprint_probe.py")), *args]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=os.environ | env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def age(*paths: Path, hours: float = 2.0) -> None:
    """Date files back, as weights written long before they are fingerprinted."""
    for p in paths:
        t = p.stat().st_mtime_ns - int(hours * 3600e9)
        os.utime(p, ns=(t, t))


@pytest.fixture(autouse=True)
def fresh_process_memo(monkeypatch):
    monkeypatch.setattr(fingerprints, "_memo", {})


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """The files fingerprints.content_digest reads, in order."""
    calls: list[Path] = []
    real = fingerprints.content_digest

    def counting(path, threads=None):
        calls.append(path)
        return real(path, threads)

    monkeypatch.setattr(fingerprints, "content_digest", counting)
    return calls


@pytest.fixture(scope="module")
def weights_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model plus a 300 MB `extra.safetensors`, all dated back: what weights_fingerprint hashes."""
    model = tmp_path_factory.mktemp("weights") / "model"
    shutil.copytree(tiny_model_dir, model)
    block = os.urandom(8 << 20)
    with (model / "extra.safetensors").open("wb") as fh:
        for i in range(BIG_MB * 10**6 // len(block) + 1):
            fh.write(i.to_bytes(8, "little") + block[8:])
    age(*model.iterdir())
    return model


# --- the memo ---


def test_repeat_command_reads_under_one_percent_of_a_remembered_file(weights_dir, tmp_path):
    big = weights_dir / "extra.safetensors"
    first = probe("memo", str(big), str(tmp_path / "cache"))
    repeat = probe("memo", str(big), str(tmp_path / "cache"))  # a new process: only the memo on disk helps
    size = big.stat().st_size
    print(f"\n{size / 1e6:.0f} MB file: first command read {first['read'] / 1e6:.1f} MB, repeat {repeat['read']} B")
    assert first["read"] >= size and repeat["read"] < 0.01 * size
    assert repeat["digest"] == first["digest"] == content_digest(big)
    assert json.loads((tmp_path / "cache" / MEMO_FILE).read_text())["files"][str(big)][3] == first["digest"]


def test_changed_file_is_hashed_again(tmp_path, monkeypatch, hashed):
    f, cache_dir = tmp_path / "weights.bin", tmp_path / "cache"
    f.write_bytes(os.urandom(1 << 20))
    age(f)
    first = file_fingerprints([f], cache_dir)[0]
    assert file_fingerprints([f], cache_dir) == [first] and len(hashed) == 1  # this process remembers
    monkeypatch.setattr(fingerprints, "_memo", {})
    assert file_fingerprints([f], cache_dir) == [first] and len(hashed) == 1  # a new process: the memo file

    age(f, hours=1)  # touched: same bytes, another mtime
    assert file_fingerprints([f], cache_dir) == [first] and len(hashed) == 2
    with f.open("r+b") as fh:  # one byte rewritten in place: same size, same inode
        fh.seek(12345)
        fh.write(bytes([f.read_bytes()[12345] ^ 1]))
    age(f)
    edited = file_fingerprints([f], cache_dir)[0]
    assert edited != first and len(hashed) == 3
    mtime = f.stat().st_mtime_ns
    shutil.copy(f, tmp_path / "copy")  # replaced by a copy: same bytes, size and mtime, another inode
    os.replace(tmp_path / "copy", f)
    os.utime(f, ns=(mtime, mtime))
    assert file_fingerprints([f], cache_dir) == [edited] and len(hashed) == 4

    recent = tmp_path / "recent.bin"  # modified just now: never remembered (the racy case)
    recent.write_bytes(b"new")
    file_fingerprints([recent], cache_dir)
    file_fingerprints([recent], cache_dir)
    assert len(hashed) == 6 and str(recent) not in json.loads((cache_dir / MEMO_FILE).read_text())["files"]

    (cache_dir / MEMO_FILE).write_text('{"files": {"')  # a broken memo file only costs a re-hash
    monkeypatch.setattr(fingerprints, "_memo", {})
    assert file_fingerprints([f], cache_dir) == [edited] and len(hashed) == 7


def test_memo_file_is_replaced_whole_when_written_at_once(tmp_path):
    store = tmp_path / MEMO_FILE
    seen, errors = [], []

    def writer(name: str) -> None:
        for i in range(25):
            fingerprints._save(store, {f"/{name}/{i}": [1, 2, 3, "d" * 32]})

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if store.exists():
            try:
                seen.append(len(json.loads(store.read_text())["files"]))
            except ValueError as e:
                errors.append(e)
    assert not errors and seen  # readers never see half a file
    files = json.loads(store.read_text())["files"]  # the last writer's view: other entries may be lost
    assert {"/a/24", "/b/24"} & set(files), sorted(files)
    assert [p.name for p in tmp_path.iterdir()] == [MEMO_FILE]  # no temporary file left behind


def test_in_process_memo_computes_once_for_four_calls(weights_dir, tmp_path, hashed):
    weight_files = sorted(p for p in weights_dir.iterdir() if p.suffix == ".safetensors")
    fps = {weights_fingerprint(str(weights_dir), tmp_path / "cache") for _ in range(4)}  # `run` with an eval set
    assert len(fps) == 1 and sorted(hashed) == weight_files  # each weight file read once


def test_tokenizer_is_loaded_once_per_process_until_its_files_change(tiny_model_dir, tmp_path, monkeypatch):
    """Every stage looks up its tokenized entry per split, each time with the tokenizer's fingerprint: one load while
    the model directory's files are unchanged; a changed chat template is a new load and a new fingerprint."""
    from pipeline.models import loading

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    loads: list[str] = []
    real = loading.load_tokenizer
    monkeypatch.setattr(loading, "load_tokenizer", lambda d, trust=False: loads.append(d) or real(d, trust))
    first = {loading.model_tokenizer_fingerprint(str(model)) for _ in range(4)}
    assert len(first) == 1 and loads == [str(model)]
    assert first == {loading.tokenizer_fingerprint(real(str(model)))}
    (model / "chat_template.jinja").write_text("{{ messages }}")
    changed = loading.model_tokenizer_fingerprint(str(model))
    assert changed not in first and loads == [str(model)] * 2


# --- the tree hash ---


def test_tree_hash_is_the_same_on_any_thread_count_and_changes_with_one_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprints, "CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(fingerprints, "READ_BYTES", 256 << 10)
    data = os.urandom((5 << 20) + 12345)  # 5 whole chunks and a partial one
    f = tmp_path / "w.bin"
    f.write_bytes(data)
    digests = {t: content_digest(f, threads=t) for t in (1, 2, 3, 8)}
    assert len(set(digests.values())) == 1, digests
    digest = digests[1]
    assert digest != hashlib.blake2b(data, digest_size=16).hexdigest()  # a tree hash, not blake2b of the file
    assert content_digest(storage.location(f"file://{f}")) == digest  # a URI: chunks read one after another
    for at in (0, (3 << 20) + 7, len(data) - 1):  # the first chunk, a middle one, the partial last one
        flipped = bytearray(data)
        flipped[at] ^= 1
        f.write_bytes(bytes(flipped))
        assert content_digest(f, threads=2) != digest, at
    chunk = 1 << 20
    f.write_bytes(data[chunk : 2 * chunk] + data[:chunk] + data[2 * chunk :])  # two chunks swapped
    assert content_digest(f, threads=2) != digest  # chunk digests combine in order
    f.write_bytes(b"")
    empty = content_digest(f)
    f.write_bytes(b"\0")
    assert len(empty) == 32 and content_digest(f) != empty


# --- lookups: sizes, checksums only with --verify ---


def test_lookup_checks_sizes_and_verify_checks_checksums(tmp_path):
    entry = tmp_path / "reference" / "k"
    entry.mkdir(parents=True)
    blob = os.urandom(1 << 20) * 40
    (entry / "shard-00000.parquet").write_bytes(blob)
    manifest = manifests.write_manifest(entry, "k", "reference", ["shard-00000.parquet"], rows=1)
    assert manifest["files"]["shard-00000.parquet"] == {
        "bytes": len(blob),
        "checksum": content_digest(entry / "shard-00000.parquet"),
    }

    start = rchar()
    manifests.read_valid_manifest(entry, "k", "")
    lookup = rchar() - start
    start = rchar()
    manifests.read_valid_manifest(entry, "k", "", verify=True)
    verified = rchar() - start
    print(f"\nlookup of a {len(blob) / 1e6:.0f} MB entry read {lookup} B; with verify {verified / 1e6:.1f} MB")
    assert lookup < 0.01 * len(blob) and verified >= len(blob)

    corrupt = bytearray(blob)
    corrupt[len(blob) // 2] ^= 0xFF
    (entry / "shard-00000.parquet").write_bytes(bytes(corrupt))
    assert manifests.read_valid_manifest(entry, "k", "")["rows"] == 1  # same size: a lookup does not read the bytes
    with pytest.raises(CacheError, match=r"shard-00000\.parquet fails its checksum"):
        manifests.read_valid_manifest(entry, "k", "", verify=True)
    (entry / "shard-00000.parquet").write_bytes(blob[:-1])
    with pytest.raises(CacheError, match="has 41943039 bytes, the manifest says 41943040"):
        manifests.read_valid_manifest(entry, "k", "")


@pytest.mark.parametrize("command", ["tokenize", "score-ref", "train", "run"])
def test_verify_flag(command):
    assert build_parser().parse_args([command, "--verify"]).verify
    assert not build_parser().parse_args([command]).verify


# --- `run` on cached stages ---


def test_repeat_run_keys_read_under_one_percent_of_the_weights(weights_dir, tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": " a", "rejected": " b"} for i in range(3)]
    for name in ("train", "eval"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r | {"split": name}) + "\n" for r in rows))
    age(tmp_path / "train.jsonl", tmp_path / "eval.jsonl")
    config = {
        "model": str(weights_dir),
        "dataset": [str(tmp_path / "train.jsonl")],
        "eval_dataset": [str(tmp_path / "eval.jsonl")],
        "cache_dir": str(tmp_path / "cache"),
        "output_dir": str(tmp_path / "out"),
    }
    first = probe("keys", json.dumps(config), "first")
    repeat = probe("keys", json.dumps(config), "repeat")
    weights = sum(p.stat().st_size for p in weights_dir.glob("*.safetensors"))
    print(
        f"\nkeys and lookups of `run` (train + eval) with {weights / 1e6:.0f} MB of weights: first command read "
        f"{first['read'] / 1e6:.1f} MB, repeat {repeat['read'] / 1e6:.1f} MB, of which loading the tokenizer "
        f"{repeat['tokenizer'] / 1e6:.1f} MB"
    )
    assert weights <= first["read"] - first["tokenizer"] < 1.05 * weights  # every weight byte read once
    assert repeat["read"] - repeat["tokenizer"] < 0.01 * weights


# --- hub ids ---


def test_hub_id_is_fingerprinted_by_its_local_snapshot(tmp_path):
    """A fake Hugging Face cache (HF_HUB_CACHE): snapshots of three commits whose files link to blobs, and
    refs/main naming each in turn. Commit c holds the same bytes as commit a."""
    hub = tmp_path / "hub"
    repo = hub / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    config = b'{"model_type": "llama"}'
    weights = {"a" * 40: b"weights v1", "b" * 40: b"weights v2", "c" * 40: b"weights v1"}
    for commit, data in weights.items():
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name, content in (("config.json", config), ("model.safetensors", data)):
            blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
            blob.write_bytes(content)
            age(blob)
            (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    fps = probe("hub", str(tmp_path / "cache"), str(repo / "refs" / "main"), *weights, HF_HUB_CACHE=str(hub))
    a, b, c = (fps[commit] for commit in weights)
    assert a != b  # a new revision is a new reference key
    assert a == c  # the identity is the snapshot's bytes, not the commit's name
    local = tmp_path / "local"  # the same bytes as a directory: the same key
    local.mkdir()
    (local / "config.json").write_bytes(config)
    (local / "model.safetensors").write_bytes(b"weights v1")
    assert weights_fingerprint(str(local), tmp_path / "cache") == a
    absent = fps["absent"]  # nothing is downloaded: a clear error instead
    assert f"model org/absent: no local snapshot of this hub id in the Hugging Face cache {hub}" in absent, absent
    assert "hf download org/absent" in absent


def test_memo_lives_in_a_uri_cache_dir_for_every_driver(tmp_path, monkeypatch, hashed):
    """A URI cache_dir holds the memo itself: a second driver (a fresh process memo, another machine's home)
    finds the digest there and reads nothing."""
    f = tmp_path / "weights.bin"
    f.write_bytes(os.urandom(1 << 16))
    os.utime(f, ns=(time.time_ns() - 10 * fingerprints.RACY_NS,) * 2)  # settled: rememberable
    cache = f"file://{tmp_path / 'shared-cache'}"
    monkeypatch.setenv("HOME", str(tmp_path / "first-home"))
    first = file_fingerprints([f], cache)
    assert len(hashed) == 1
    monkeypatch.setattr(fingerprints, "_memo", {})  # another driver
    monkeypatch.setenv("HOME", str(tmp_path / "second-home"))
    assert file_fingerprints([f], cache) == first and len(hashed) == 1
    assert json.loads((tmp_path / "shared-cache" / MEMO_FILE).read_text())["files"][str(f)][3] == first[0]
    assert not (tmp_path / "first-home").exists()  # nothing kept on the driver's own disk
