"""The pipeline on a real S3 API: a local moto server on 127.0.0.1 and pyarrow's S3 filesystem pointed at it by
AWS_ENDPOINT_URL, as a job is pointed at S3 or an S3-compatible store.

One `run` in its own process with the dataset, the eval dataset, `cache_dir`, `output_dir` and `storage_path`
all on s3://, 2 training workers at ZeRO-2, rank 0 killed after the step-2 checkpoint (`DPO_PIPELINE_FAULT`), so
the restarted group resumes from the checkpoint on S3. Checked: it finishes; every entry was committed by its
manifest with no leftover; the table is Arrow files; step 1's loss is ln 2 with reference scores that went
through S3 (the policy is the reference at step 1); both ranks resumed from step 2, each fetching the shared
files and its own optimizer partition but not the other rank's; the final model, the metrics and the report
are on S3; a second `run` reuses every cache entry. And two jobs started together on one entry build it once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from pipeline.train.faults import FAULT_ENV

BUCKET = "dpo"
WORDS = ("apple", "river", "stone", "cloud", "light", "green", "bread", "music", "paper", "water", "chair", "smile")
ROWS = [{"prompt": f"Spell {w}:", "chosen": f" {' '.join(w)}", "rejected": f" {w[::-1]}"} for w in WORDS]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server for this module, its bucket, and the environment that points boto3 and pyarrow at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env, pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]
    server.stop()


def put(fs: pafs.FileSystem, key: str, text: str) -> str:
    with fs.open_output_stream(f"{BUCKET}/{key}") as fh:
        fh.write(text.encode())
    return f"s3://{BUCKET}/{key}"


def keys(fs: pafs.FileSystem, prefix: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(i.path[len(BUCKET) + 1 :] for i in infos if i.type == pafs.FileType.File)


def run(root: Path, cfg: dict, env: dict) -> subprocess.CompletedProcess:
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--config", str(root / "config.yaml")],
        env={**os.environ, **env, "RAY_ADDRESS": "local"},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_run_on_s3_resumes_after_a_killed_worker_and_reuses_its_cache(s3, tiny_model_dir, tmp_path):
    env, fs = s3
    data = "".join(json.dumps(r) + "\n" for r in ROWS)
    train = put(fs, "data/train/part-0.jsonl", data)
    evals = put(fs, "data/eval.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    cfg = {
        "model": str(tiny_model_dir),
        "dataset": [train.rsplit("/", 1)[0]],  # a prefix: every data object under it
        "eval_dataset": [evals],
        "cache_dir": f"s3://{BUCKET}/cache",
        "output_dir": f"s3://{BUCKET}/out",
        "storage_path": f"s3://{BUCKET}/checkpoints",
        "run_name": "s3",
        "num_workers": 2,
        "per_device_train_batch_size": 2,
        "max_steps": 4,
        "save_steps": 2,
        "logging_steps": 1,
        "eval_steps": 4,
        "learning_rate": 1e-3,
        "zero_stage": 2,  # each rank's optimizer partition is a file of its own
        "gradient_checkpointing": False,
        "max_failures": 1,
        "max_new_tokens": 0,
    }
    fault = {FAULT_ENV: f"kill:2:{tmp_path / 'killed'}"}
    first = run(tmp_path, cfg, {**env, **fault})
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "killed").exists()  # the fault happened
    for rank in (0, 1):
        assert f"[train] rank {rank}: resumed from step 2" in first.stdout, first.stdout[-3000:]
    # each rank fetched the shared files and its own partition, never the other rank's
    fetched = re.findall(r"\[train\] rank (\d): fetched (\d+) of the checkpoint's (\d+) files", first.stdout)
    assert sorted(int(r) for r, _, _ in fetched) == [0, 1], first.stdout[-3000:]
    for _, got, of in fetched:
        assert int(of) - int(got) == 1  # the other rank's optimizer partition, alone, was left on S3

    cache = keys(fs, "cache")
    entries = {tuple(k.split("/")[1:3]) for k in cache if k.count("/") >= 3}
    assert {kind for kind, _ in entries} == {"tokenized", "reference", "table"}
    assert len(entries) == 6  # train and eval: one entry of each kind
    for kind, key in entries:  # committed by its manifest, which lists every file there
        manifest = json.loads(fs.open_input_file(f"{BUCKET}/cache/{kind}/{key}/manifest.json").read())
        assert sorted([*manifest["files"], "manifest.json"]) == sorted(
            k.rsplit("/", 1)[1] for k in cache if k.startswith(f"cache/{kind}/{key}/")
        )
    assert [k for k in cache if "/table/" in k and k.endswith(".arrow")]

    lines = [json.loads(x) for x in fs.open_input_file(f"{BUCKET}/out/metrics.jsonl").read().decode().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the reference scores came back from S3
    out = keys(fs, "out")
    assert {"out/final/model.safetensors", "out/final/config.json", "out/report.md", "out/train_summary.json"} <= set(
        out
    )
    assert keys(fs, "checkpoints/s3")  # Ray Train's checkpoints at storage_path

    again = run(tmp_path, cfg, env)
    assert again.returncode == 0, again.stderr[-3000:]
    for label in ("[tokenize] train", "[tokenize] eval", "[score-ref] train", "[score-ref] eval"):
        assert f"{label}: reusing cached" in again.stdout, label
    assert again.stdout.count("reusing cached training table") == 2
    assert keys(fs, "cache") == cache  # nothing rewritten, nothing added


def test_two_jobs_at_once_on_one_s3_entry_build_it_once(s3, tiny_model_dir, tmp_path):
    """Two `tokenize` commands started together on the same data and cache on S3: the claim object lets one
    build the entry while the other waits, then reuses it; one entry, one manifest, no claim left behind."""
    env, fs = s3
    data = put(fs, "together/pairs.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS))
    args = ["tokenize", "--model", str(tiny_model_dir), "--dataset", data,
            "--cache_dir", f"s3://{BUCKET}/together-cache", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    code = "import sys; from stages.cli import main; sys.exit(main(sys.argv[1:]))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *args],
            env={**os.environ, **env, "RAY_ADDRESS": "local"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    built = [o for o in outs if "12 pairs kept" in o]
    reused = [o for o in outs if "reusing cached tokenized data" in o]
    assert len(built) == 1 and len(reused) == 1, outs
    cache = keys(fs, "together-cache/tokenized")
    assert len({k.split("/")[2] for k in cache}) == 1 and sum(k.endswith("manifest.json") for k in cache) == 1
    assert not [k for k in keys(fs, "together-cache") if k.endswith(".claim")]
