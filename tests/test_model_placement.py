"""A model split over devices (`pipeline.models.placement`, `load_causal_lm(placement=...)`,
`gpus_per_ref_actor`), on CPU.

There are no GPUs here, so the split is accelerate's offload, the same hooks a multi-GPU layout uses: some modules
held in host memory ("cpu"), the rest read from the model's safetensors file at every forward ("disk"), all
executed on the CPU. Between calls an offloaded module's weights sit on the meta device, so the forward must ask
the hooks where a module computes. Checked here:

- the split model's per-sequence log-probs equal the single-device model's (padded and padding-free rows);
- loading it holds only the "cpu" share of the weights in host memory, measured in a fresh interpreter as the
  rise of the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) over the load,
  against the size of model.safetensors. The load is followed by one read of every weight the model holds,
  because transformers maps float32 safetensors lazily: a plain load otherwise looks cheaper than it is;
- a model that fits nowhere is refused before any weight is read, with the sizes and the key to change, by
  laying it out on an empty (meta) model against a made-up budget of two small GPUs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_packing import _random_pairs
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from pipeline.config import config_from_dict
from pipeline.errors import ConfigError, PipelineError
from pipeline.models.forward import collate_pairs, module_device, sequence_forward
from pipeline.models.kernels import VARLEN_SDPA, register_varlen_sdpa
from pipeline.models.loading import load_causal_lm
from pipeline.models.placement import GPU_WEIGHT_FRACTION, device_map

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024**2
# 308 MB in float32, three quarters of it in the 8 decoder layers (26 MB each), so that a budget of half the
# model keeps the embedding and two layers in memory and sends six layers, the norm and the LM head to disk.
BIG = {"hidden_size": 256, "num_layers": 8, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 8192}

PROBE = r"""
import json, re, sys
import torch
from pipeline.models.forward import collate_pairs, sequence_forward
from pipeline.models.kernels import VARLEN_SDPA, register_varlen_sdpa
from pipeline.models.loading import load_causal_lm

def status(key):
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

def reset_peak():  # VmHWM := VmRSS; where that is not allowed the rise below only grows (never understated)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

model_dir, placement = sys.argv[1], json.loads(sys.argv[2])
if placement is not None:
    placement = {int(k) if k.isdigit() else k: v for k, v in placement.items()}
batch = collate_pairs(json.load(sys.stdin), 0)
torch.set_num_threads(1)
register_varlen_sdpa()
out = {}
for attn, padding_free in ((VARLEN_SDPA, True), ("sdpa", False)):
    reset_peak()
    before = status("VmRSS")
    model = load_causal_lm(model_dir, attn_implementation=attn, placement=placement)
    with torch.no_grad():
        for p in model.parameters():
            if p.device.type != "meta":
                p.sum()
    if padding_free:
        out["load"] = status("VmHWM") - before
        out["devices"] = sorted({str(d) for d in getattr(model, "hf_device_map", {"": "one"}).values()})
        reset_peak()
        before = status("VmRSS")
    with torch.inference_mode():
        stats = sequence_forward(model, batch, padding_free=padding_free)
    out["packed" if padding_free else "padded"] = stats.logps.tolist()
    if padding_free:
        out["forward"] = status("VmHWM") - before
    del model
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def big_model_dir(test_cache: Path, tokenizer) -> Path:
    return make_tiny_model(test_cache / "big-llama", tokenizer, seed=1, **BIG)


def _probe(model_dir: Path, placement: dict | None, columns: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", PROBE, str(model_dir), json.dumps(placement)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _result(proc: subprocess.Popen, columns: dict) -> dict:
    out, err = proc.communicate(json.dumps(columns), timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_offloaded_model_scores_like_one_device_and_loads_a_fraction_of_it(big_model_dir, capsys):
    size = (big_model_dir / "model.safetensors").stat().st_size
    assert size > 250 * MIB  # big enough that the interpreter's own noise (a few MB) does not matter
    columns = _random_pairs(4, seed=1)
    probes = [_probe(big_model_dir, p, columns) for p in (None, {"cpu": size // 2, "disk": 0})]
    whole, split = (_result(p, columns) for p in probes)

    assert whole["devices"] == ["one"] and split["devices"] == ["cpu", "disk"]
    diffs = {}
    for rows in ("padded", "packed"):
        diffs[rows] = max(abs(a - b) for a, b in zip(split[rows], whole[rows], strict=True))
        assert diffs[rows] <= 1e-6, (rows, split[rows], whole[rows])
    assert whole["load"] >= 0.9 * size  # the measurement sees a whole-model load for what it is
    assert split["load"] <= 0.6 * size
    with capsys.disabled():
        print(
            f"\n[placement] max |Δlogp| padded {diffs['padded']:.1e}, padding-free {diffs['packed']:.1e}; "
            f"host memory over the load: one device {whole['load'] / size:.2f}x, cpu+disk "
            f"{split['load'] / size:.2f}x of model.safetensors ({size / MIB:.0f} MiB); over one forward "
            f"{whole['forward'] / size:.2f}x and {split['forward'] / size:.2f}x"
        )


@pytest.mark.parametrize("padding_free", [False, True])
def test_embedding_and_head_on_disk(tiny_model_dir, padding_free):
    """The modules the forward reads a device from, both offloaded: their weights are on the meta device, so only
    the hooks know where they compute (the old `next(model.parameters()).device` gave meta)."""
    register_varlen_sdpa()
    attn = VARLEN_SDPA if padding_free else "sdpa"
    layout = {
        "model.embed_tokens": "disk",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "disk",
    }
    split = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, device_map=layout, dtype=torch.float32, attn_implementation=attn
    ).eval()
    assert next(split.parameters()).device.type == "meta" and split.lm_head.weight.device.type == "meta"
    assert module_device(split.lm_head) == module_device(split.model.embed_tokens) == torch.device("cpu")
    batch = collate_pairs(_random_pairs(4, seed=2), 0)
    whole = load_causal_lm(str(tiny_model_dir), attn_implementation=attn)
    with torch.inference_mode():
        a = sequence_forward(split, batch, padding_free=padding_free)
        b = sequence_forward(whole, batch, padding_free=padding_free)
    assert a.logps.device == torch.device("cpu")
    assert (a.logps - b.logps).abs().max() <= 1e-6 and torch.equal(a.tokens, b.tokens)


def test_a_model_that_fits_no_actor_is_refused_with_sizes_and_the_key(tiny_model_dir):
    """The tiny model is 25 MB in float32, half of it the 12.6 MB embedding and half the 12.6 MB LM head; accelerate
    keeps room for the largest module on the first GPU, so two 16 MiB GPUs hold no layout, and three do."""
    model = str(tiny_model_dir)
    two = {0: 16 * MIB, 1: 16 * MIB}
    with pytest.raises(PipelineError) as e:
        device_map(model, "float32", two)
    message = str(e.value)
    for part in ("does not fit", "0.02 GiB in float32", "GPU 0 0.02 GiB, GPU 1 0.02 GiB", "gpus_per_ref_actor to"):
        assert part in message, message
    assert "dtype: bfloat16" in message
    need = int(message.split("gpus_per_ref_actor to at least ")[1].split(" ")[0])
    layout = device_map(model, "float32", dict.fromkeys(range(need), 16 * MIB))  # the advice is right
    assert {d for d in layout.values()} <= set(range(need)) and len(set(layout.values())) > 1
    assert device_map(model, "bfloat16", two)  # half the size fits the same two GPUs

    with pytest.raises(PipelineError, match=r"does not fit.*allow disk offload"):
        load_causal_lm(model, placement={"cpu": 4 * MIB})  # refused from the meta layout, no weight read


def test_llama_70b_needs_three_80gb_gpus(tmp_path):
    """The README's example, laid out on the meta device: Llama-3-70B's shapes are 131.4 GiB in bfloat16. An 80 GB
    GPU (81559 MiB) with ~600 MiB taken by the CUDA context leaves 67.1 GiB for weights after the 15% kept for
    activations: 134.2 GiB on two GPUs, but layers of 1.6 GiB and the 2 GiB embedding do not pack into that."""
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    ).save_pretrained(tmp_path)
    total = 81559 * MIB
    per_gpu = int(total - 600 * MIB - (1 - GPU_WEIGHT_FRACTION) * total)
    with pytest.raises(PipelineError, match=r"131\.42 GiB in bfloat16.*gpus_per_ref_actor to at least 3 "):
        device_map(str(tmp_path), "bfloat16", {0: per_gpu, 1: per_gpu})
    layout = device_map(str(tmp_path), "bfloat16", {0: per_gpu, 1: per_gpu, 2: per_gpu})
    assert set(layout.values()) == {0, 1, 2}


def test_gpus_per_ref_actor_key():
    assert config_from_dict({}).scale.ref_actor_gpus == 0  # CPU: the actors ask Ray for no GPU
    assert config_from_dict({"use_gpu": True}).scale.ref_actor_gpus == 1
    assert config_from_dict({"use_gpu": True, "gpus_per_ref_actor": 4}).scale.ref_actor_gpus == 4
    with pytest.raises(ConfigError, match="gpus_per_ref_actor=0 is not allowed"):
        config_from_dict({"use_gpu": True, "gpus_per_ref_actor": 0})
    with pytest.raises(ConfigError, match="1 unless use_gpu is true"):
        config_from_dict({"gpus_per_ref_actor": 2})
