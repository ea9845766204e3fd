"""Errors of ours raised inside Ray — a Ray Data task, a Ray Data actor's set-up — reach the console as our
one clear line and status 2, never as a Ray traceback (DESIGN.md invariant 8)."""

from __future__ import annotations

import json
import pickle
import shutil

import ray

from pipeline.errors import DataError, PipelineError, find_pipeline_error
from stages.cli import main


def test_our_message_survives_ray_appending_to_it():
    e = DataError("a.parquet: not a Parquet file")
    e.args = (e.args[0] + "\nFailed to apply UDF transform after 1/1 attempts",)  # what Ray Data does
    back = pickle.loads(pickle.dumps(e))
    assert str(e) == str(back) == "a.parquet: not a Parquet file"


def test_error_raised_in_a_ray_task_is_found(ray_session):
    @ray.remote
    def fail() -> None:
        raise DataError("rows.jsonl, row 3: no 'chosen'")

    try:
        ray.get(fail.remote())
    except Exception as e:  # RayTaskError(DataError)
        found = find_pipeline_error(e)
    assert isinstance(found, PipelineError) and str(found) == "rows.jsonl, row 3: no 'chosen'"


def last_line(err: str) -> str:
    return [x for x in err.splitlines() if x.strip()][-1]


def test_corrupt_parquet_input_is_one_clear_line(ray_session, tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "pairs.parquet"
    bad.write_bytes(b"PAR1" + b"\x00" * 64)  # the magic bytes, then nothing a reader can use
    rc = main(["tokenize", "--model", str(tiny_model_dir), "--dataset", str(bad),
               "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert last_line(err).startswith(f"error: {bad}") and "Traceback" not in err


def test_model_failing_to_load_in_the_scoring_actor_is_one_clear_line(ray_session, tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "broken-ref"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 1024)  # present (fingerprinted), not loadable
    rows = [{"prompt": f"Add {i} and {i}:", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"} for i in range(6)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--model", str(tiny_model_dir), "--ref_model", str(broken), "--dataset", str(tmp_path / "pairs.jsonl"),
            "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert main(["tokenize", *args]) == 0
    capsys.readouterr()
    rc = main(["score-ref", *args])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert last_line(err).startswith(f"error: cannot load model {broken}") and "Traceback" not in err
