"""The training table (pipeline.data.table): a streaming merge join of stage 1's and stage 2's sorted files.

Checked against an independent join (pyarrow's hash join, then a sort), on entries cut the way the stages cut
them (several tokenized files covering pair_id ranges, listed out of order; reference shards of ranges,
one of them empty); the first steps' losses from the memory-mapped table equal those from the in-memory join
exactly; the table is mapped, not copied into private memory; gaps and disorder are refused.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import schema
from pipeline.config import config_from_dict
from pipeline.data import table as table_module
from pipeline.data.entries import ReferenceScores, TokenizedData
from pipeline.data.pairs import PairTable
from pipeline.data.table import LENGTHS, build_table, open_table, training_schedule
from pipeline.errors import CacheError
from pipeline.models.loading import load_causal_lm
from pipeline.train.step import micro_step

N = 50
pytestmark = pytest.mark.usefixtures("ray_session")  # the table's ranges are merged by Ray tasks


def arrow_files(entry) -> list:
    return sorted(entry.path.glob("*.arrow"))


def pair_rows(n: int = N, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        chosen = [rng.randrange(5, 200) for _ in range(rng.randrange(4, 12))]
        rejected = chosen[:2] + [rng.randrange(5, 200) for _ in range(rng.randrange(2, 10))]
        rows.append(
            {
                schema.PAIR_ID: hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest(),
                schema.CHOSEN_INPUT_IDS: chosen,
                schema.REJECTED_INPUT_IDS: rejected,
                schema.CHOSEN_COMPLETION_START: 2,
                schema.REJECTED_COMPLETION_START: 2,
                schema.PROMPT_LEN: 2,
                schema.TRUNCATED: False,
                schema.REF_CHOSEN_LOGPS: -rng.random() * 20,
                schema.REF_REJECTED_LOGPS: -rng.random() * 20,
                schema.CHOSEN_TOKENS: len(chosen) - 2,
                schema.REJECTED_TOKENS: len(rejected) - 2,
                schema.REF_CHOSEN_SHARED_LOGPS: -rng.random() * 10,
                schema.REF_CHOSEN_TAIL_LOGPS: -rng.random(),
                schema.REF_REJECTED_SHARED_LOGPS: -rng.random() * 10,
                schema.REF_REJECTED_TAIL_LOGPS: -rng.random(),
            }
        )
    return sorted(rows, key=lambda r: r[schema.PAIR_ID])


def write_entries(root, rows, cuts=(0, 13, 31), shards=(0, 9, 9, 22, 40), drop_ref: int | None = None):
    """A tokenized entry in files starting at `cuts` (named so that name order != pair_id order) and a
    reference entry in shards starting at `shards` (an empty one when two starts are equal)."""
    tok_dir, ref_dir = root / "tok", root / "ref"
    tok_dir.mkdir(parents=True)
    ref_dir.mkdir(parents=True)
    ref_rows = [r for i, r in enumerate(rows) if i != drop_ref]
    tok_files, ref_files = {}, {}
    for k, (a, b) in enumerate(zip(cuts, [*cuts[1:], len(rows)])):
        name = f"{len(cuts) - k}-part.parquet"  # reversed: the merge must order files by their pair_ids
        pq.write_table(pa.Table.from_pylist(rows[a:b], schema=schema.TOKENIZED_SCHEMA), tok_dir / name)
        tok_files[name] = {}
    for k, (a, b) in enumerate(zip(shards, [*shards[1:], len(ref_rows)])):
        name = f"shard-{k:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(ref_rows[a:b], schema=schema.REFERENCE_SCHEMA), ref_dir / name)
        ref_files[name] = {}
    tok = TokenizedData(tok_dir, "tokkey", {"rows": len(rows), "files": tok_files})
    ref = ReferenceScores(ref_dir, "refkey", {"rows": len(ref_rows), "files": ref_files})
    return tok, ref


def hash_join(tok: TokenizedData, ref: ReferenceScores) -> pa.Table:
    """The independent answer: every file read whole, joined by pair_id through a dict, sorted."""
    scores = {r[schema.PAIR_ID]: r for f in ref.files for r in pq.read_table(f).to_pylist()}
    rows = [{**r, **scores[r[schema.PAIR_ID]]} for f in tok.files for r in pq.read_table(f).to_pylist()]
    return pa.Table.from_pylist(sorted(rows, key=lambda r: r[schema.PAIR_ID]))


def cfg_for(root, **kw):
    return config_from_dict({"cache_dir": str(root / "cache"), "output_dir": str(root / "out"), **kw})


def test_table_equals_an_independent_join(tmp_path):
    tok, ref = write_entries(tmp_path, pair_rows())
    entry = build_table(cfg_for(tmp_path), tok, ref, "train")
    table = open_table(entry).table
    expected = hash_join(tok, ref)
    assert table.schema == schema.TABLE_SCHEMA and table.num_rows == N == entry.manifest["rows"]
    for name in schema.TABLE_SCHEMA.names:
        if name in (schema.CHOSEN_LEN, schema.REJECTED_LEN):
            side = schema.CHOSEN_INPUT_IDS if name == schema.CHOSEN_LEN else schema.REJECTED_INPUT_IDS
            assert table[name].to_pylist() == [len(x) for x in expected[side].to_pylist()]
        else:
            assert table[name].to_pylist() == expected[name].to_pylist(), name


def test_second_build_reuses_the_entry(tmp_path, capsys):
    tok, ref = write_entries(tmp_path, pair_rows())
    cfg = cfg_for(tmp_path)
    first = build_table(cfg, tok, ref, "train")
    (file,) = arrow_files(first)
    mtime = file.stat().st_mtime_ns
    again = build_table(cfg, tok, ref, "train")
    assert again.key == first.key and file.stat().st_mtime_ns == mtime
    assert "reusing cached training table" in capsys.readouterr().out


def test_first_steps_losses_equal_the_in_memory_join(tmp_path, tiny_model_dir):
    """The mapped table feeds the step exactly what the in-memory join does: same losses, bit for bit."""
    tok, ref = write_entries(tmp_path, pair_rows())
    cfg = cfg_for(tmp_path, per_device_train_batch_size=4, gradient_checkpointing=False, max_tokens_per_batch=60)
    entry = build_table(cfg, tok, ref, "train")
    mapped, joined = open_table(entry), PairTable.from_batches([hash_join(tok, ref)])
    schedule = training_schedule(cfg, entry)
    assert schedule.steps_in_epoch(0) >= 3
    model = load_causal_lm(str(tiny_model_dir))
    for step in range(3):
        for idx in schedule.micro_batches(step, 0):
            with torch.no_grad():
                a = micro_step(cfg, model, mapped, idx, pad_id=0)
                b = micro_step(cfg, model, joined, idx, pad_id=0)
            assert a.loss.item() == b.loss.item() and torch.equal(a.metric_row, b.metric_row)


def test_table_is_mapped_not_copied(tmp_path):
    tok, ref = write_entries(tmp_path, pair_rows(2000), cuts=(0, 700, 1500), shards=(0, 500, 1200, 1900))
    entry = build_table(cfg_for(tmp_path), tok, ref, "train")
    before = pa.total_allocated_bytes()
    pairs = open_table(entry)
    rows = pairs.rows(np.array([5, 1999]))
    grown = pa.total_allocated_bytes() - before
    (file,) = arrow_files(entry)
    assert file.stat().st_size > 100_000 and grown < 0.01 * file.stat().st_size
    assert len(rows[schema.PAIR_ID]) == 2


def test_training_schedule_reads_lengths_from_the_entry(tmp_path):
    tok, ref = write_entries(tmp_path, pair_rows())
    cfg = cfg_for(tmp_path, per_device_train_batch_size=2, max_tokens_per_batch=40)
    entry = build_table(cfg, tok, ref, "train")
    on_driver = training_schedule(cfg, entry)
    on_worker = open_table(entry).schedule(cfg, cfg.scale.num_workers)
    assert [on_driver.step_batches(k)[0].tolist() for k in range(3)] == [
        on_worker.step_batches(k)[0].tolist() for k in range(3)
    ]


@pytest.mark.parametrize("drop", [0, 24, N - 1])
def test_a_pair_missing_from_the_reference_is_refused(tmp_path, drop):
    tok, ref = write_entries(tmp_path, pair_rows(), shards=(0, 9, 22, 40), drop_ref=drop)
    with pytest.raises(CacheError, match=r"do not cover|hold pairs"):
        build_table(cfg_for(tmp_path), tok, ref, "train")


def test_files_overlapping_in_pair_id_are_refused(tmp_path):
    rows = pair_rows()
    tok, ref = write_entries(tmp_path, rows)
    bad = rows[20:25] + rows[:3]  # a file out of pair_id order
    pq.write_table(pa.Table.from_pylist(bad, schema=schema.TOKENIZED_SCHEMA), tok.path / "2-part.parquet")
    with pytest.raises(CacheError, match="not in pair_id order"):
        build_table(cfg_for(tmp_path), tok, ref, "train")


def test_a_table_past_the_file_limit_is_several_files_from_several_tasks(tmp_path, monkeypatch):
    """With a 64 kB limit the table of 2,000 pairs is cut into ranges of the pair_id space, each merged by its
    own task into files of at most the limit, Arrow's framing included; mapped together they are the one-file
    table, row for row, and the lengths file follows the same order."""
    tok, ref = write_entries(tmp_path, pair_rows(2000), cuts=(0, 700, 1500), shards=(0, 500, 1200, 1900))
    whole = build_table(cfg_for(tmp_path / "one"), tok, ref, "train")
    limit = 64_000
    monkeypatch.setattr(table_module, "SHARD_BYTES", limit)
    entry = build_table(cfg_for(tmp_path / "many"), tok, ref, "train")
    files = arrow_files(entry)
    assert len(arrow_files(whole)) == 1 and len(files) >= 6, files
    assert len({f.name.split("-")[1] for f in files}) >= 4  # ranges: one task each
    assert all(f.stat().st_size <= limit for f in files), [f.stat().st_size for f in files]
    assert sorted(entry.manifest["files"]) == sorted([f.name for f in files] + [LENGTHS])
    assert open_table(entry).table.equals(open_table(whole).table)
    assert np.array_equal(np.load(entry.path / LENGTHS), np.load(whole.path / LENGTHS))


def test_uri_cache_is_copied_once_per_node(tmp_path, monkeypatch):
    """With a URI cache_dir, the first open copies the file to the node's local cache; later opens map it."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    tok, ref = write_entries(tmp_path, pair_rows())
    entry = build_table(cfg_for(tmp_path, cache_dir=f"file://{tmp_path}/remote-cache"), tok, ref, "train")
    first = open_table(entry).table
    local = next((tmp_path / "home").rglob("*.arrow"))
    mtime = local.stat().st_mtime_ns
    second = open_table(entry).table
    assert first.equals(second) and local.stat().st_mtime_ns == mtime and first.num_rows == N
