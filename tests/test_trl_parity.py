"""Parity with trl==1.16.0 itself: TRL's DPOTrainer.compute_loss and the production training step
(`pipeline.train.step.micro_step` reading a `PairTable` of the training-table schema, whose reference shared/tail
columns were scored by stage 2's forward code) on the same tiny Llama, reference and pairs must give the same
loss, gradients and logged metrics, for every loss type and a few combinations."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers renames, inside TRL

from datasets import Dataset  # noqa: E402
from process_group import run_ranks  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402

from pipeline import schema  # noqa: E402
from pipeline.config import LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, LossConfig, config_from_dict  # noqa: E402
from pipeline.core.metrics import finalize, slot_total  # noqa: E402
from pipeline.data.pairs import PairTable  # noqa: E402
from pipeline.models.forward import collate_pairs, sequence_forward  # noqa: E402
from pipeline.models.kernels import choose_kernels  # noqa: E402
from pipeline.train.step import micro_step  # noqa: E402

VOCAB = 128
PAD, EOS = 0, 1
IDX = np.arange(3)  # the micro-batch: every pair of the table


def stage1_columns(examples: list[dict]) -> dict[str, list]:
    """The pairs as stage 1 writes them: whole sequences and where their completions start."""
    return {
        schema.PAIR_ID: [f"pair-{i}" for i in range(len(examples))],
        schema.CHOSEN_INPUT_IDS: [e["prompt_ids"] + e["chosen_ids"] for e in examples],
        schema.REJECTED_INPUT_IDS: [e["prompt_ids"] + e["rejected_ids"] for e in examples],
        schema.CHOSEN_COMPLETION_START: [len(e["prompt_ids"]) for e in examples],
        schema.REJECTED_COMPLETION_START: [len(e["prompt_ids"]) for e in examples],
    }


def stage2_scores(model, columns: dict[str, list], padding_free: bool) -> dict[str, list[float]]:
    """The reference columns as stage 2 computes them (`stages/stage2_score_ref.py`): the production collator
    and forward under inference mode, the shared/tail split kept as float64."""
    batch = collate_pairs(columns, PAD)
    with torch.inference_mode():
        stats = sequence_forward(model, batch, padding_free=padding_free)
    b = batch.num_pairs
    shared, tail = stats.shared_logps.double().tolist(), stats.tail_logps.double().tolist()
    return {
        schema.REF_CHOSEN_SHARED_LOGPS: shared[:b],
        schema.REF_CHOSEN_TAIL_LOGPS: tail[:b],
        schema.REF_REJECTED_SHARED_LOGPS: shared[b:],
        schema.REF_REJECTED_TAIL_LOGPS: tail[b:],
    }


def training_table(columns: dict[str, list], ref: dict[str, list[float]]) -> PairTable:
    """Stage 1's columns joined with stage 2's, in the training table's schema, as stage 3 opens it."""
    lengths = {
        schema.CHOSEN_LEN: [len(ids) for ids in columns[schema.CHOSEN_INPUT_IDS]],
        schema.REJECTED_LEN: [len(ids) for ids in columns[schema.REJECTED_INPUT_IDS]],
    }
    return PairTable.from_batches([pa.Table.from_pydict({**columns, **lengths, **ref}, schema=schema.TABLE_SCHEMA)])


def word_tokenizer_and_llama() -> tuple[PreTrainedTokenizerFast, LlamaForCausalLM]:
    """A word-level tokenizer over w0..w124 and a tiny random Llama over it (seed 0)."""
    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    return tokenizer, LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer, model = word_tokenizer_and_llama()
    ref_model = copy.deepcopy(model)
    with torch.no_grad():  # a reference that differs slightly, so rewards are not zero
        for p in ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))

    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        report_to=[],
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        use_weighting=True,  # makes TRL compute log_sum_sq_probs
        max_length=None,
        save_strategy="no",
        disable_tqdm=True,
    )
    train = Dataset.from_dict({"prompt": ["w1 w2"], "chosen": [" w3"], "rejected": [" w4"]})
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train, processing_class=tokenizer)
    model.train()

    # Pair 0's chosen completion is the policy's greedy continuation, so mean_token_accuracy is not 0.
    prompt = [5, 9, 17]
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)[0, 3:].tolist()
    examples = [
        {"prompt_ids": prompt, "chosen_ids": [*greedy, EOS], "rejected_ids": [40, 41, EOS]},
        {"prompt_ids": [7], "chosen_ids": [50, EOS], "rejected_ids": [60, 61, 62, 63, 64, EOS]},
        {"prompt_ids": [8, 9, 10, 11, 12], "chosen_ids": [70, 71, 72, EOS], "rejected_ids": [EOS]},
    ]
    columns = stage1_columns(examples)

    # Stages 2 and 3 run padding-free rows by default, on the CPU with our per-sequence SDPA (pipeline.models.kernels),
    # which TRL's padded forward cannot use: copies of the policy and reference with it (same weights) compute
    # our side of the main cases. The cached-reference cases run right-padded rows on TRL's own policy.
    kernels = choose_kernels(config_from_dict({}).model, cuda=False, dtype="float32")
    packed, packed_ref = copy.deepcopy(model), copy.deepcopy(ref_model)
    for m in (packed, packed_ref):
        m.set_attn_implementation(kernels.attn_implementation)

    # Cached reference scores standing in for TRL's precompute_ref_log_probs: the policy's own stage-2 scores
    # (right-padded rows, the other layout) shifted so that the batch's reward order differs from the policy's
    # and the aot losses really sort.
    cached = stage2_scores(model, columns, padding_free=False)
    for key, shift in (
        (schema.REF_CHOSEN_SHARED_LOGPS, [-4.0, -2.0, 5.0]),
        (schema.REF_REJECTED_SHARED_LOGPS, [6.0, -2.7, -5.0]),
    ):
        cached[key] = [v + s for v, s in zip(cached[key], shift)]
    return SimpleNamespace(
        trainer=trainer,
        model=model,
        packed=packed,
        batch=DataCollatorForPreference(pad_token_id=PAD)(examples),
        pairs=training_table(columns, stage2_scores(packed_ref, columns, padding_free=True)),
        cached=cached,
        cached_pairs=training_table(columns, cached),
    )


CASES = [
    *({"loss_type": (name,)} for name in LOSS_TYPES if name != "exo_pair" and name not in REFERENCE_FREE_LOSS_TYPES),
    {"loss_type": ("exo_pair",), "label_smoothing": 1e-3},
    {"loss_type": ("sigmoid", "bco_pair", "sft"), "loss_weights": (0.8, 0.2, 1.0)},
    {"loss_type": ("sigmoid", "sft"), "ld_alpha": 0.5},
    {"loss_type": ("sigmoid_norm", "ipo"), "ld_alpha": 0.0, "beta": 0.5},
    {"loss_type": ("sigmoid",), "f_divergence_type": "forward_kl"},
    {"loss_type": ("ipo", "discopop"), "f_divergence_type": "js_divergence", "discopop_tau": 0.2},
    {
        "loss_type": ("hinge", "robust"),
        "f_divergence_type": "alpha_divergence",
        "f_alpha_divergence_coef": 0.3,
        "label_smoothing": 0.2,
    },
    {"loss_type": ("aot", "aot_unpaired"), "label_smoothing": 0.1},
    {"loss_type": ("sigmoid",), "use_weighting": True},
    {"loss_type": ("ipo", "nca_pair", "apo_down"), "use_weighting": True, "ld_alpha": 0.3},
    {"loss_type": ("exo_pair",), "label_smoothing": 0.1, "use_weighting": True, "beta": 2.0},
]


def case_id(case: dict) -> str:
    return "-".join(f"{v}" if k == "loss_type" else f"{k}={v}" for k, v in case.items()).replace("'", "")


def configure(trainer: DPOTrainer, cfg: LossConfig, precomputed: bool = False) -> None:
    """Point the reused trainer at `cfg` (the attributes _compute_loss reads)."""
    trainer.precompute_ref_logps = precomputed
    trainer.beta = cfg.beta
    trainer.loss_types = list(cfg.loss_type)
    trainer.loss_weights = list(cfg.weights)
    trainer.label_smoothing = cfg.label_smoothing
    trainer.f_divergence_type = cfg.f_divergence_type
    trainer.f_alpha_divergence_coef = cfg.f_alpha_divergence_coef
    trainer.use_weighting = cfg.use_weighting
    trainer.ld_alpha = cfg.ld_alpha
    trainer.args.discopop_tau = cfg.discopop_tau
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0  # num_tokens: this batch's tokens alone


def trl_precomputed(cached: dict[str, list[float]], ld_alpha: float | None) -> dict[str, torch.Tensor]:
    """What TRL's precompute_ref_log_probs stores for these scores: one log-prob per sequence, LD-combined
    (its compute_ref_log_probs: shared + α·tail), float32."""
    out = {}
    for side in ("chosen", "rejected"):
        shared, tail = (torch.tensor(cached[f"ref_{side}_{part}_logps"]).float() for part in ("shared", "tail"))
        out[f"ref_{side}_logps"] = shared + tail if ld_alpha is None else shared + ld_alpha * tail
    return out


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def our_step(setup, case: dict, precomputed: bool):
    """The production step on the table: padding-free rows (the default), or right-padded ones on the cached
    reference. micro_step takes the bare module as its engine (it reads `.device` and runs the forward);
    backward, which stage 3 leaves to DeepSpeed's engine, is ours."""
    cfg = config_from_dict({**case, "padding_free": not precomputed})
    policy = setup.model if precomputed else setup.packed
    policy.zero_grad()
    result = micro_step(cfg, policy, setup.cached_pairs if precomputed else setup.pairs, IDX, PAD)
    metrics = finalize(result.metric_row) | {"num_tokens": slot_total(result.metric_row, "input_tokens")}
    return result.loss, metrics, policy


def trl_result(setup, case: dict, precomputed: bool) -> tuple[float, dict[str, float], dict[str, torch.Tensor]]:
    """TRL's loss, logged metrics and gradients for `case` on the setup's batch."""
    trainer, model = setup.trainer, setup.model
    cfg = LossConfig(**case)
    configure(trainer, cfg, precomputed)
    model.zero_grad()
    inputs = {**setup.batch, **trl_precomputed(setup.cached, cfg.ld_alpha)} if precomputed else setup.batch
    trl_loss = trainer.compute_loss(model, inputs)
    trl_loss.backward()
    return trl_loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}, grads(model)


def compare_with_trl(setup, case: dict, precomputed: bool) -> None:
    loss, metrics, policy = our_step(setup, case, precomputed)
    loss.backward()
    assert_matches(trl_result(setup, case, precomputed), (loss.item(), metrics, grads(policy)))


def assert_matches(trl: tuple, ours: tuple) -> None:
    """Values to 1e-5, or 1e-6 of their size where that is more (8 float32 ulps: sppo_hard's loss is ~52, where
    one ulp is 4e-6 and the two sums' orders differ by a few on some CPUs); gradients to 1e-6 + 1e-4 of theirs."""
    (trl_loss, trl_metrics, trl_grads), (loss, metrics, our_grads) = trl, ours
    assert loss == pytest.approx(trl_loss, rel=1e-6, abs=1e-5), (loss, trl_loss)
    assert set(metrics) == set(trl_metrics) | {"loss"}
    for name, value in trl_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-5), name
    assert metrics["loss"] == pytest.approx(trl_loss, rel=1e-6, abs=1e-5)
    assert our_grads.keys() == trl_grads.keys()
    for name, g in trl_grads.items():
        torch.testing.assert_close(our_grads[name], g, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_loss_gradients_and_metrics_match_trl(setup, case):
    compare_with_trl(setup, case, precomputed=False)


CACHED_CASES = [
    {"loss_type": ("aot",)},
    {"loss_type": ("aot_unpaired",), "label_smoothing": 0.2},
    {"loss_type": ("sigmoid", "sft"), "ld_alpha": 0.5},
    {"loss_type": ("sigmoid_norm",), "use_weighting": True},
    {"loss_type": ("discopop", "hinge"), "f_divergence_type": "js_divergence"},
]


@pytest.mark.parametrize("case", CACHED_CASES, ids=case_id)
def test_cached_reference_matches_trl_precompute(setup, case):
    compare_with_trl(setup, case, precomputed=True)


def test_every_case_matches_trl_with_each_sequence_split_over_two_ranks(setup):
    """The same production step with sequence_parallel_size 2 (two gloo processes, `tests/process_group.py`):
    each rank runs half of every sequence's positions (packed rows for the main cases, right-padded ones for the
    cached reference), and the group's loss, summed metric rows and rank-averaged gradients equal TRL's."""
    runs = [(case, False) for case in CASES] + [(case, True) for case in CACHED_CASES]
    expected = [trl_result(setup, case, precomputed) for case, precomputed in runs]
    rows = {precomputed: t.rows(IDX) for precomputed, t in ((False, setup.pairs), (True, setup.cached_pairs))}
    weights = {n: p.detach().clone() for n, p in setup.model.state_dict().items()}
    for rank in run_ranks(split_steps, 2, setup.model.config.to_dict(), weights, rows, runs):
        for trl, ours in zip(expected, rank, strict=True):
            assert_matches(trl, ours)


def split_steps(rank: int, world: int, config: dict, weights: dict, tables: dict, runs: list) -> list[tuple]:
    """One rank of `test_every_case_matches_trl_with_each_sequence_split_over_two_ranks`."""
    import torch.distributed as dist
    from transformers import LlamaConfig

    from pipeline.models.sequence_parallel import enable_ulysses, sequence_group

    group = sequence_group(world)
    models = {}
    for precomputed, attn in ((False, choose_kernels(config_from_dict({}).model, False, "float32")), (True, None)):
        model = LlamaForCausalLM(LlamaConfig.from_dict(config))
        model.load_state_dict(weights)
        model.set_attn_implementation(attn.attn_implementation if attn else "sdpa")
        enable_ulysses(model.config, model.config._attn_implementation, group)
        models[precomputed] = model.train()
    out = []
    for case, precomputed in runs:
        cfg = config_from_dict({**case, "padding_free": not precomputed})
        policy, table = models[precomputed], rows_table(tables[precomputed])
        policy.zero_grad()
        result = micro_step(cfg, policy, table, IDX, PAD, group=group)
        result.loss.backward()
        row = result.metric_row.clone()
        dist.all_reduce(row)  # the step's one collective over the metric rows
        g = grads(policy)
        for t in g.values():  # DeepSpeed's mean over the ranks
            dist.all_reduce(t)
            t /= world
        out.append((result.loss.item(), finalize(row) | {"num_tokens": slot_total(row, "input_tokens")}, g))
    return out


def rows_table(rows: dict[str, list]) -> PairTable:
    """The rows of a table, as a table again (what crosses into the rank processes is plain lists)."""
    return PairTable.from_batches([pa.Table.from_pydict(rows, schema=schema.TABLE_SCHEMA)])


def test_the_batch_exercises_the_metrics_and_the_sort(setup):
    trainer, model = setup.trainer, setup.model
    rows = setup.pairs.rows(IDX)
    for side in (schema.REF_CHOSEN_TAIL_LOGPS, schema.REF_REJECTED_TAIL_LOGPS):  # ld_alpha has tails to weigh
        assert any(v < 0 for v in rows[side]), side
    ours = collate_pairs(rows, PAD)  # the tensors the step ran are the ones TRL's collator made
    for name in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(getattr(ours, name), setup.batch[name]), name
    configure(trainer, LossConfig())
    trainer.compute_loss(model, setup.batch)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert 0 < logged["mean_token_accuracy"] < 1
    assert 0 < logged["rewards/accuracies"] < 1
    assert logged["rewards/chosen"] != 0 and logged["rewards/margins"] != 0
    with torch.no_grad():
        sigmoid, aot = (our_step(setup, {"loss_type": (name,)}, precomputed=True)[0] for name in ("sigmoid", "aot"))
    assert abs(sigmoid - aot) > 1e-3


def test_trl_sft_with_weighting_raises(setup):
    """TRL 1.16 bug: sft + use_weighting multiplies the WPO weights in place into an expanded tensor. Ours
    gives mean_b(ω_b)·sft (tests/test_losses.py); this pins TRL's behaviour so an upgrade is noticed."""
    trainer, model = setup.trainer, setup.model
    case = {"loss_type": ("sft",), "use_weighting": True}
    configure(trainer, LossConfig(**case))
    with pytest.raises(RuntimeError, match="single memory location"):
        trainer.compute_loss(model, setup.batch)
    loss, _, _ = our_step(setup, case, precomputed=False)
    assert torch.isfinite(loss)
