"""Export one tensor at a time (`pipeline.train.export`): the files equal what `save_pretrained` and peft's
`merge_and_unload` write, bit for bit, in shards with HF's names and index, and reload with `from_pretrained`.
Without ZeRO-3 here; tests/test_zero3_sharding.py runs the same export on partitioned weights over 2 ranks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.models.safetensors_files import INDEX, WEIGHTS
from pipeline.train.export import MERGED, export_model, plan_shards, shard_name


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, one file or the shards its index names."""
    if (path / WEIGHTS).is_file():
        return load_file(path / WEIGHTS)
    files = set(json.loads((path / INDEX).read_text())["weight_map"].values())
    return {k: v for f in sorted(files) for k, v in load_file(path / f).items()}


def assert_bitwise_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


def test_plan_shards_by_hand():
    # limit 6: 3+3 fills one shard, 5+1 the next, 9 is alone (bigger than the limit), 2 starts the last
    assert plan_shards([3, 3, 5, 1, 9, 2], 6) == [[0, 1], [2, 3], [4], [5]]
    assert plan_shards([7], 6) == [[0]] and plan_shards([], 6) == []
    assert shard_name(0, 1) == "model.safetensors" and shard_name(1, 12) == "model-00002-of-00012.safetensors"


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_export_equals_save_pretrained(tmp_path, tokenizer, tied):
    """A tiny model in shards of <= 1 MB (the 12.6 MB embedding and head alone in theirs): the same tensors, under
    the same keys (a tied head saved once, as the embedding), as one `save_pretrained` file; the index lists every
    key once with the sum of their bytes; the same config; `from_pretrained` gives the same model."""
    from tiny_models import make_tiny_model
    from transformers import AutoModelForCausalLM

    source = make_tiny_model(tmp_path / "source", tokenizer, seed=3, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_pretrained(source)
    export_model(model, tokenizer, tmp_path / "ours", rank=0, use_peft=False, shard_bytes=2**20)
    model.save_pretrained(tmp_path / "theirs")

    ours, theirs = load_dir(tmp_path / "ours"), load_file(tmp_path / "theirs" / WEIGHTS)
    assert_bitwise_equal(ours, theirs)
    assert ("lm_head.weight" in ours) is not tied
    index = json.loads((tmp_path / "ours" / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == (2 if tied else 3) and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(theirs)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in theirs.values())
    for shard in shards:
        tensors = load_file(tmp_path / "ours" / shard).values()
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors) <= 2**20
    read = lambda d: json.loads((tmp_path / d / "config.json").read_text())  # noqa: E731
    assert read("ours") == read("theirs")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert_bitwise_equal(dict(reloaded.state_dict()), dict(model.state_dict()))
    assert (tmp_path / "ours" / "tokenizer.json").is_file()


def test_lora_export_equals_peft_adapter_and_merge(tmp_path, tokenizer):
    """LoRA with trained-looking (random, non-zero) adapters on q/v of a tied model: the adapter file is peft's,
    merged/ equals `merge_and_unload` of a copy bit for bit, and the exported module still has its adapters,
    unmerged (the old export merged the trained module in place)."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import make_tiny_model
    from transformers import AutoModelForCausalLM

    source = make_tiny_model(tmp_path / "source", tokenizer, seed=4, tie_word_embeddings=True)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(source), LoraConfig(r=4, lora_alpha=8))
    torch.manual_seed(5)
    for name, p in policy.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.1)
    before = {k: v.clone() for k, v in policy.state_dict().items()}

    export_model(policy, tokenizer, tmp_path / "ours", rank=0, use_peft=True, shard_bytes=2**20)
    policy.save_pretrained(tmp_path / "theirs")
    merged = copy.deepcopy(policy).merge_and_unload()
    merged.save_pretrained(tmp_path / "theirs" / MERGED)

    adapter = "adapter_model.safetensors"
    assert_bitwise_equal(load_file(tmp_path / "ours" / adapter), load_file(tmp_path / "theirs" / adapter))
    ours = load_dir(tmp_path / "ours" / MERGED)
    assert_bitwise_equal(ours, load_file(tmp_path / "theirs" / MERGED / WEIGHTS))
    base = load_file(source / WEIGHTS)
    changed = sorted(k for k in base if not torch.equal(ours[k], base[k]))
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    assert_bitwise_equal(dict(policy.state_dict()), before)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours" / MERGED)
    assert_bitwise_equal(dict(reloaded.state_dict()), dict(merged.state_dict()))


def test_mapped_state_dict_reads_the_files_tensors(tmp_path, tokenizer):
    """Views of the memory-mapped files (one file, and the 1 MB shards the export writes) equal what safetensors
    loads, bit for bit, dtypes and shapes included; bfloat16 too."""
    from tiny_models import make_tiny_model
    from transformers import AutoModelForCausalLM

    from pipeline.models.safetensors_files import checkpoint_files, mapped_state_dict

    source = make_tiny_model(tmp_path / "source", tokenizer, seed=6)
    assert_bitwise_equal(mapped_state_dict(checkpoint_files(source)), load_file(source / WEIGHTS))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    export_model(model, tokenizer, tmp_path / "sharded", rank=0, use_peft=False, shard_bytes=2**20)
    files = checkpoint_files(tmp_path / "sharded")
    assert len(files) == 3
    mapped = mapped_state_dict(files)
    assert_bitwise_equal(mapped, load_dir(tmp_path / "sharded"))
    assert all(t.dtype == torch.bfloat16 for t in mapped.values())
    assert checkpoint_files(tmp_path) is None  # no weights there
