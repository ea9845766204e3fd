"""ZeRO-3 from load to export on 2 ranks (two processes, gloo, real DeepSpeed; tests/zero3_probe.py): the policy
is built partitioned — each rank holds half of every weight and never the whole — and the export, gathering one
tensor at a time, writes the checkpoint it loaded back bit for bit (no training in between: the weights are the
checkpoint's). Full fine-tuning on an untied model; LoRA on a tied one (its fresh adapter merges to nothing)."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_export import assert_bitwise_equal, load_dir

from pipeline.models.safetensors_files import INDEX, WEIGHTS
from pipeline.train.export import MERGED

PROBE = Path(__file__).with_name("zero3_probe.py")


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_ranks(config: dict, tmp_path: Path) -> list[dict]:
    (tmp_path / "config.json").write_text(json.dumps(config))
    port = free_port()
    args = [str(port), str(tmp_path / "config.json"), str(tmp_path / "export")]
    procs = [
        subprocess.Popen(
            [sys.executable, str(PROBE), str(r), "2", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


@pytest.mark.parametrize("lora", [False, True], ids=["full-untied", "lora-tied"])
def test_zero3_builds_partitioned_and_exports_the_checkpoint(tmp_path, tokenizer, lora):
    from tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "model", tokenizer, seed=1, tie_word_embeddings=lora)
    config = {
        "model": str(model),
        "dataset": [str(tmp_path / "unused.jsonl")],
        "output_dir": str(tmp_path / "out"),
        "zero_stage": 3,
        "num_workers": 2,
        "use_peft": lora,
        "lora_r": 4,
    }
    ranks = run_ranks(config, tmp_path)
    checkpoint = load_file(model / WEIGHTS)

    # every weight of the checkpoint is partitioned from the start: half of it per rank (DeepSpeed pads an odd
    # size), nothing whole; the adapter, created after loading, is partitioned later by the engine
    for r in ranks:
        base = {k: v for k, v in r["held"].items() if "lora_" not in k}
        assert len(base) == len(checkpoint)
        for name, held in base.items():
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert held["whole"] == checkpoint[key].numel(), name
            assert held["local"] == 0 and held["partition"] == math.ceil(held["whole"] / 2), name
        assert all(k.startswith("base_model.model.") for k in r["held"]) is lora

    out = tmp_path / "export"
    exported = out / MERGED if lora else out
    assert (exported / INDEX).is_file()  # several 1 MB shards
    assert_bitwise_equal(load_dir(exported), checkpoint)
    if lora:
        adapter = load_file(out / "adapter_model.safetensors")
        assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
        assert all(torch.count_nonzero(v) == 0 for k, v in adapter.items() if "lora_B" in k)
