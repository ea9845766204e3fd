"""Sequence parallelism: every sequence split over k ranks (Ulysses) gives the unsplit numbers.

Two gloo processes stand in for two training workers (`process_group.run_ranks`); a float64 tiny Llama runs the
production forward (`sequence_forward` with a `SequenceGroup`) on right-padded and packed rows whose lengths do
not divide by k. Every per-sequence statistic, and the weight gradients averaged over the ranks as DeepSpeed
averages them, must equal the one-process forward; each rank must have run only its half of the positions.
"""

from __future__ import annotations

import pytest
import torch
from process_group import run_ranks

from pipeline import schema
from pipeline.config import config_from_dict
from pipeline.core.logprobs import SequenceStats
from pipeline.errors import ConfigError
from pipeline.models.forward import collate_pairs, sequence_forward
from pipeline.models.kernels import VARLEN_SDPA, register_varlen_sdpa
from pipeline.models.sequence_parallel import check_heads, check_model

LAYOUTS = {"padded": ("sdpa", False), "packed": (VARLEN_SDPA, True)}


def _llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    register_varlen_sdpa()
    model = LlamaForCausalLM(config).double()
    model.set_attn_implementation(attn)
    return model


def _pairs() -> dict[str, list]:
    """Three pairs; the longest sequence has 13 tokens and the packed row 49: neither divides by 2."""
    g = torch.Generator().manual_seed(1)
    keys = (schema.CHOSEN_INPUT_IDS, schema.REJECTED_INPUT_IDS, schema.CHOSEN_COMPLETION_START,
            schema.REJECTED_COMPLETION_START)  # fmt: skip
    columns: dict[str, list] = {k: [] for k in keys}
    for chosen, rejected, prompt in ((13, 5, 3), (4, 11, 2), (9, 7, 5)):
        ids = torch.randint(3, 97, (max(chosen, rejected),), generator=g).tolist()
        columns[schema.CHOSEN_INPUT_IDS].append(ids[:chosen])
        columns[schema.REJECTED_INPUT_IDS].append(
            ids[:prompt] + torch.randint(3, 97, (rejected - prompt,), generator=g).tolist()
        )
        columns[schema.CHOSEN_COMPLETION_START].append(prompt)
        columns[schema.REJECTED_COMPLETION_START].append(prompt)
    return columns


def _loss(stats: SequenceStats) -> torch.Tensor:
    """Uses every statistic that carries a gradient, each with its own weights, so a missing sum shows."""
    w = torch.arange(1, 7, dtype=torch.float64)
    return (w * stats.logps).sum() + (w.flip(0) * stats.shared_logps).sum() + 0.3 * stats.tail_logps.square().sum()


def _forward(model, padding_free: bool, group=None) -> tuple[dict[str, list], dict[str, torch.Tensor]]:
    seen: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    stats = sequence_forward(
        model, collate_pairs(_pairs(), 0), with_metrics=True, padding_free=padding_free, group=group
    )
    hook.remove()
    _loss(stats).backward()
    values = {k: v.tolist() for k, v in vars(stats).items()} | {"tokens_run": seen}
    return values, {n: p.grad.clone() for n, p in model.named_parameters()}


def _split_rank(rank: int, world: int) -> dict[str, tuple[dict, dict]]:
    import torch.distributed as dist

    from pipeline.models.sequence_parallel import enable_ulysses, sequence_group

    group = sequence_group(world)
    out = {}
    for layout, (attn, padding_free) in LAYOUTS.items():
        model = _llama(attn)
        enable_ulysses(model.config, attn, group)
        values, grads = _forward(model, padding_free, group)
        for g in grads.values():  # DeepSpeed's gradient mean over the data-parallel world (here: the group)
            dist.all_reduce(g)
            g /= world
        out[layout] = values, grads
    return out


def test_two_ranks_give_the_unsplit_stats_and_gradients():
    ranks = run_ranks(_split_rank, 2)
    for layout, (attn, padding_free) in LAYOUTS.items():
        whole, whole_grads = _forward(_llama(attn), padding_free)
        run = whole.pop("tokens_run")[0]  # 6 x 13 padded, 49 packed
        assert run == (78 if layout == "padded" else 49)
        for rank in ranks:
            values, grads = rank[layout]
            # each rank embedded only its half of the positions, padded up to a multiple of 2
            assert values.pop("tokens_run") == [(6 * 7) if layout == "padded" else 25], layout
            for name, expected in whole.items():
                torch.testing.assert_close(torch.tensor(values[name]), torch.tensor(expected), atol=1e-10, rtol=0)
            for name, g in whole_grads.items():
                torch.testing.assert_close(grads[name], g, atol=1e-10, rtol=1e-9, msg=f"{layout} {name}")


def test_heads_that_do_not_split_are_refused_naming_the_key():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    check_heads(config, 3)  # 6 and 3 both divide
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=4 .* 6 attention heads .* divisor of 6"):
        check_heads(config, 4)
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=2 .* 3 key/value heads"):
        check_heads(config, 2)
    check_heads(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=1), 4)  # 1 KV head, copied


def test_the_driver_refuses_a_model_that_cannot_split_before_any_worker_starts(tiny_model_dir):
    """stage 3's driver reads the model's config.json (4 attention heads, 2 key/value heads)."""
    check_model(str(tiny_model_dir), 1)
    check_model(str(tiny_model_dir), 4)  # one key/value head copied to each pair of ranks
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=3 .* its 4 attention heads"):
        check_model(str(tiny_model_dir), 3)


@pytest.mark.parametrize(
    "values,match",
    [
        ({"num_workers": 3, "sequence_parallel_size": 2}, r"sequence_parallel_size=2 .* divisor of num_workers=3"),
        ({"num_workers": 2, "sequence_parallel_size": 0}, r"sequence_parallel_size=0 .* integer >= 1"),
        (
            {"num_workers": 2, "sequence_parallel_size": 2, "attn_implementation": "eager", "padding_free": False},
            r"attn_implementation='eager' .* sequence_parallel_size > 1",
        ),
        ({"activation_offloading": True}, r"activation_offloading=True .* unless use_gpu is true"),
    ],
)
def test_configs_that_cannot_split_are_refused(values, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(values)


def test_tiled_mlp_runs_in_tiles_and_changes_no_number():
    """tiled_mlp: the 49-position packed row runs each MLP in ceil(49 / 32) = 2 tiles; log-probs and gradients
    equal the untiled model's (float64)."""
    import copy

    from pipeline.models.tiling import tile_mlps

    plain = _llama(VARLEN_SDPA)
    tiled = copy.deepcopy(plain)
    assert tile_mlps(tiled) == 2
    widths: list[int] = []
    tiled.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: widths.append(i[0].size(-2)))
    (a, a_grads), (b, b_grads) = (_forward(m, padding_free=True) for m in (plain, tiled))
    assert widths[:2] == [25, 24]  # forward: two tiles of the 49 positions (backward recomputes each)
    for name in ("logps", "shared_logps", "tail_logps"):
        torch.testing.assert_close(torch.tensor(b[name]), torch.tensor(a[name]), atol=1e-10, rtol=0)
    for name, g in a_grads.items():
        torch.testing.assert_close(b_grads[name], g, atol=1e-10, rtol=1e-9, msg=name)

    class NoMLP(torch.nn.Module):
        config = plain.config

    with pytest.raises(ConfigError, match=r"tiled_mlp=true: NoMLP has no `\*\.mlp` modules"):
        tile_mlps(NoMLP())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_activation_offloading_keeps_checkpoints_in_host_memory_and_changes_no_number():
    """activation_offloading on a GPU: with the checkpointed model's saved tensors in pinned host memory, the
    log-probs and gradients are exactly the on-device run's (the memory it saves: bench/gpu_check.py row 7)."""
    from pipeline.train.step import saved_for_backward_in_host_memory

    model = _llama("sdpa").cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = collate_pairs(_pairs(), 0)
    results = []
    for on in (False, True):
        model.zero_grad()
        with saved_for_backward_in_host_memory(on):
            stats = sequence_forward(model, batch)
        _loss(stats).backward()
        results.append((stats.logps.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=0, rtol=0)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, atol=0, rtol=0, msg=name)


def _communicator(rank: int, world: int) -> tuple[bool, bool, float]:
    from deepspeed.comm import comm

    total = torch.tensor([float(rank + 1)])
    comm.all_reduce(total)
    return comm.is_initialized(), comm.cdb.shm_comm_op is None, total.item()


def test_deepspeed_communicator_on_cpu_compiles_no_shared_memory_op(tmp_path, monkeypatch):
    """The harness makes DeepSpeed's communicator as the engine does (`init_deepspeed_comm`): on CPU without the
    shared-memory all-reduce op, whose JIT build would leave its files in TORCH_EXTENSIONS_DIR; all-reduce works."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    assert run_ranks(_communicator, 2) == [(True, True, 3.0)] * 2
    assert not (tmp_path / "torch_extensions").exists()
