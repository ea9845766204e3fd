"""The prepared GPU check, kept from rotting on CPU: `bench/gpu_check.py --smoke` end to end, and row 1 shown to
catch a packed attention that leaks across sequences.

    .venv/bin/python -m pytest tests/test_gpu_check.py
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses resolve their string annotations through it
    spec.loader.exec_module(module)
    return module


# --- the whole script, as a subprocess on CPU ---


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu_check") / "smoke.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, whatever this machine has
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 packed" in proc.stdout and "5 no ray" in proc.stdout  # the table was printed
    results: dict[str, Any] = json.loads(out.read_text())
    return results


def test_smoke_packed_matches_padded_in_float32(smoke: dict[str, Any]) -> None:
    row = smoke["rows"]["packed_vs_padded"]
    assert smoke["dtype"] == "float32" and row["status"] == "PASS"
    assert row["attn_packed"] == "dpo_varlen_sdpa" and row["attn_padded"] == "sdpa"
    # float32 against float64 on sums of up to ~40 tokens of ~-6 nats: well under 1e-3
    assert 0 < row["dtype_vs_float64"] < 1e-3
    assert row["max_abs_diff"] <= row["tolerance"] < 1e-3
    assert row["max_rel_diff"] < 1e-5
    assert row["sequences"] == 8 and len(row["packed_logps"]) == 8


def test_smoke_first_loss_is_ln2(smoke: dict[str, Any]) -> None:
    row = smoke["rows"]["ln2_step1"]
    assert row["status"] == "PASS"
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert row["max_abs_reward"] < 1e-6
    assert math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0


def test_smoke_liger_skipped_on_cpu_with_a_reason(smoke: dict[str, Any]) -> None:
    row = smoke["rows"]["liger_vs_plain"]
    assert row["status"] == "SKIP" and row["result"].startswith("skipped: ") and "CUDA" in row["result"]


def test_smoke_throughput_fields(smoke: dict[str, Any]) -> None:
    speed = [row for key, row in smoke["rows"].items() if key.startswith("speed_")]
    assert [(row["shape"], row["padding_free"]) for row in speed] == [
        ("tiny packed", True),
        ("tiny padded", False),
        ("tiny-wide packed", True),
    ]
    for row in speed:
        assert row["status"] == "INFO"
        for field in ("tokens_per_s", "model_flops_per_step", "flops_6nd_per_step", "mfu", "mfu_6nd", "params"):
            assert row[field] > 0, field
        assert row["tokens_per_step"] < row["padded_tokens_per_step"]  # the lengths vary, so padding exists
        assert row["peak_mem_gib"] is None  # CPU: no CUDA allocator to ask


def test_smoke_long_context_row(smoke: dict[str, Any]) -> None:
    """Rows 6 and 7 on CPU: one pair of 2,048 tokens (the GPU run: 65,536) through the packed path, timed."""
    for key in ("long_context", "long_context_offloaded"):  # on CPU row 7 runs without offloading (no pinning)
        row = smoke["rows"][key]
        assert row["status"] == "INFO" and row["pairs"] == 1 and row["padding_free"] is True
        assert row["tokens_per_step"] == 2048 and row["tokens_per_s"] > 0 and row["shape"].startswith("tiny-wide")


def test_smoke_imports_no_ray_or_deepspeed(smoke: dict[str, Any]) -> None:
    row = smoke["rows"]["no_forbidden_imports"]
    assert (row["status"], row["imported"]) == ("PASS", [])
    assert smoke["ok"] is True
    assert smoke["wall_s"] < 60  # a smoke run is seconds; minutes would mean the tiny sizes were lost


# --- row 1 can fail: a packed attention that sees the earlier sequences of its row ---


def test_row1_catches_attention_leaking_across_packed_sequences() -> None:
    """Causal SDPA over the whole packed row, ignoring `cu_seq_lens_q`: every sequence after the first attends to
    the ones before it, so its log-probs change by far more than float32 rounding, and row 1 must say FAIL."""
    from transformers import AttentionInterface

    from pipeline.models.kernels import VARLEN_SDPA, Kernels, register_varlen_sdpa

    script = _load_script()
    register_varlen_sdpa()

    def leaky(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, scale=scaling, is_causal=True, enable_gqa=query.size(1) != key.size(1)
        )
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("leaky_test_sdpa", leaky)
    base = script.build_model(script.TINY, torch.device("cpu"), torch.float32, seed=0)
    exact = script.copy.deepcopy(base).to(torch.float64)
    batch = script.random_pairs(script.CHECK_PAIRS_SMOKE, script.TINY.vocab, seed=1)
    padded = Kernels("sdpa", padding_free=False, liger=False)
    good, _ = script.packed_vs_padded(base, exact, batch, Kernels(VARLEN_SDPA, True, False), padded)
    bad, tol = script.packed_vs_padded(base, exact, batch, Kernels("leaky_test_sdpa", True, False), padded)
    assert good.status == "PASS"
    assert bad.status == "FAIL" and bad.data["max_abs_diff"] > 1000 * tol


def test_without_cuda_or_smoke_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "never.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gpu_check:")]
    assert len(lines) == 1 and "no CUDA device" in lines[0]
    assert not out.exists()
