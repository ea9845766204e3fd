"""Parity with trl==1.16.0's experimental CPO and ORPO trainers: their own `get_batch_loss_metrics` (TRL's
concatenated forward, loss and logged metrics) and the production step (`pipeline.train.step.micro_step` reading a
`PairTable` of the reference-free training-table schema) on the same tiny Llama and pairs must give the same
loss, gradients and metrics. Ours cpo is CPOTrainer's loss_type "sigmoid", simpo its "simpo" (and "alphapo"),
orpo the ORPOTrainer.

Deliberate differences, checked as such: orpo's NLL covers the chosen completion, TRL's ORPO NLL the whole chosen
sequence with its prompt; TRL's CPO logs nll_loss 0 when cpo_alpha is 0, we log the NLL; logits/* follow
DPOTrainer (a mean over completion tokens), so they are not compared.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import Tensor

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers renames, inside TRL

from datasets import Dataset  # noqa: E402
from test_trl_parity import EOS, PAD, grads, stage1_columns, word_tokenizer_and_llama  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402
from trl.experimental.utils import DPODataCollatorWithPadding  # noqa: E402

from pipeline import schema  # noqa: E402
from pipeline.config import config_from_dict  # noqa: E402
from pipeline.core.metrics import finalize  # noqa: E402
from pipeline.data.pairs import PairTable  # noqa: E402
from pipeline.data.table import table_schema  # noqa: E402
from pipeline.models.kernels import choose_kernels  # noqa: E402
from pipeline.train.step import micro_step  # noqa: E402

# Three pairs of different prompt and completion lengths: TRL's rows are right-padded.
EXAMPLES = [
    {"prompt_ids": [5, 9, 17], "chosen_ids": [20, 21, 22, 23, EOS], "rejected_ids": [40, 41, EOS]},
    {"prompt_ids": [7], "chosen_ids": [50, EOS], "rejected_ids": [60, 61, 62, 63, 64, EOS]},
    {"prompt_ids": [8, 9, 10, 11, 12], "chosen_ids": [70, 71, 72, EOS], "rejected_ids": [EOS]},
]
# Long completions: summed log-probs below −104, where float32 e^{logps} underflows to 0.
LONG_EXAMPLES = [
    {"prompt_ids": [5, 9], "chosen_ids": [*range(20, 50), EOS], "rejected_ids": [*range(60, 85), EOS]},
]
COMPARED = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "nll_loss",
)
ORPO_COMPARED = (*COMPARED, "log_odds_ratio", "log_odds_chosen")
NOT_COMPARED = ("logits/chosen", "logits/rejected")  # DPOTrainer's definition (module docstring)

# (our config keys, the CPOConfig keys TRL runs them with)
CPO_CASES = [
    ({"loss_type": ("cpo",)}, {"loss_type": "sigmoid"}),
    (
        {"loss_type": ("cpo",), "cpo_alpha": 0.0, "label_smoothing": 0.1},
        {"loss_type": "sigmoid", "cpo_alpha": 0.0, "label_smoothing": 0.1},
    ),
    # α on summed log-probs: |r| up to e^{α·29}/α ≈ 4e6 here; β 1e-6 keeps β·r within ±5, where the float32
    # rounding of r (relative ~1e-7·|α·log π|, ours and TRL's) stays under the loss tolerance.
    (
        {"loss_type": ("cpo",), "alphapo_alpha": 0.5, "cpo_beta": 1e-6},
        {"loss_type": "sigmoid", "alpha": 0.5, "beta": 1e-6},
    ),
    ({"loss_type": ("simpo",)}, {"loss_type": "simpo"}),
    (
        {"loss_type": ("simpo",), "cpo_alpha": 0.0, "simpo_gamma": 1.0, "cpo_beta": 2.0},
        {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 1.0, "beta": 2.0},
    ),
    ({"loss_type": ("simpo",), "alphapo_alpha": 0.25, "cpo_alpha": 0.0}, {"loss_type": "alphapo", "alpha": 0.25}),
]
# (our config keys, the ORPOConfig keys)
ORPO_CASES = [({"loss_type": ("orpo",)}, {}), ({"loss_type": ("orpo",), "orpo_lambda": 0.5}, {"beta": 0.5})]
LONG_CASE = ({"loss_type": ("cpo",), "alphapo_alpha": 0.1}, {"loss_type": "sigmoid", "alpha": 0.1})


def case_id(case: tuple[dict, dict]) -> str:
    return "-".join(f"{v[0]}" if k == "loss_type" else f"{k}={v}" for k, v in case[0].items())


def trl_features(example: dict[str, list[int]]) -> dict[str, list[int]]:
    """A pair as the trainers' `tokenize_row` gives it: whole sequences, labels −100 on the prompt."""
    out = {}
    for side in ("chosen", "rejected"):
        ids = example["prompt_ids"] + example[f"{side}_ids"]
        out[f"{side}_input_ids"] = ids
        out[f"{side}_attention_mask"] = [1] * len(ids)
        out[f"{side}_labels"] = [-100] * len(example["prompt_ids"]) + example[f"{side}_ids"]
    return out


def reference_free_table(examples: list[dict]) -> PairTable:
    """Stage 1's columns in the training table's schema of a run without a reference (no ref_* columns)."""
    columns = stage1_columns(examples)
    lengths = {
        schema.CHOSEN_LEN: [len(ids) for ids in columns[schema.CHOSEN_INPUT_IDS]],
        schema.REJECTED_LEN: [len(ids) for ids in columns[schema.REJECTED_INPUT_IDS]],
    }
    return PairTable.from_batches([pa.Table.from_pydict({**columns, **lengths}, schema=table_schema(False))])


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    tokenizer, model = word_tokenizer_and_llama()

    out = str(tmp_path_factory.mktemp("trl"))
    common = {
        "output_dir": out,
        "report_to": [],
        "bf16": False,
        "use_cpu": True,
        "max_length": 64,
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    # Every case's TRL config, made before the trainers: a TrainingArguments resets accelerate's shared state.
    configs = {case_id(case): CPOConfig(**common, **case[1]) for case in (*CPO_CASES, LONG_CASE)}
    configs |= {case_id(case): ORPOConfig(**common, **case[1]) for case in ORPO_CASES}
    train = Dataset.from_dict({"prompt": ["w1 w2"], "chosen": [" w3"], "rejected": [" w4"]})
    trainers = {
        cls: cls(model=model, args=args_cls(**common), train_dataset=train, processing_class=tokenizer)
        for cls, args_cls in ((CPOTrainer, CPOConfig), (ORPOTrainer, ORPOConfig))
    }
    model.train()

    # The production step runs padding-free rows (the default) with our per-sequence SDPA on the CPU, which
    # TRL's padded forward cannot use: a copy of the policy with it (same weights) computes our side.
    packed = copy.deepcopy(model)
    packed.set_attn_implementation(
        choose_kernels(config_from_dict({}).model, cuda=False, dtype="float32").attn_implementation
    )
    collate = DPODataCollatorWithPadding(pad_token_id=PAD)
    return SimpleNamespace(
        model=model,
        packed=packed,
        cpo=trainers[CPOTrainer],
        orpo=trainers[ORPOTrainer],
        configs=configs,
        batch=collate([trl_features(e) for e in EXAMPLES]),
        pairs=reference_free_table(EXAMPLES),
        long_batch=collate([trl_features(e) for e in LONG_EXAMPLES]),
        long_pairs=reference_free_table(LONG_EXAMPLES),
    )


def configure(trainer: CPOTrainer | ORPOTrainer, args: CPOConfig | ORPOConfig) -> None:
    """Point a reused trainer at `args`: the attributes its __init__ copies from them."""
    trainer.beta = args.beta
    if isinstance(args, CPOConfig):
        trainer.loss_type, trainer.label_smoothing = args.loss_type, args.label_smoothing
        trainer.cpo_alpha, trainer.simpo_gamma, trainer.alpha = args.cpo_alpha, args.simpo_gamma, args.alpha


def masked_nll(parity: SimpleNamespace, batch: dict[str, Any]) -> Tensor:
    """TRL's chosen NLL with the prompt masked: CPOTrainer's `concatenated_forward` (cpo_alpha ≠ 0) takes the
    cross-entropy of the chosen labels, −100 on prompt and padding; ORPO's same function takes the input ids."""
    configure(parity.cpo, parity.configs["cpo"])
    return parity.cpo.concatenated_forward(parity.model, batch)[4]


def our_step(
    parity: SimpleNamespace, case: dict, pairs: PairTable
) -> tuple[Tensor, dict[str, float], dict[str, Tensor]]:
    """The production step on a reference-free table, and its backward (DeepSpeed's in stage 3)."""
    cfg = config_from_dict(case)
    assert not cfg.loss.needs_reference
    parity.packed.zero_grad()
    result = micro_step(cfg, parity.packed, pairs, np.arange(len(pairs)), PAD)
    result.loss.backward()
    return result.loss, finalize(result.metric_row), grads(parity.packed)


def assert_parity(
    parity: SimpleNamespace, case: dict, trl_loss: float, trl_metrics: dict[str, float], names: tuple[str, ...]
) -> None:
    """Our step against TRL's loss, the gradients left on TRL's model, and TRL's metrics `names`."""
    trl_grads = grads(parity.model)
    loss, metrics, ours = our_step(parity, case, parity.pairs)
    assert abs(loss.item() - trl_loss) < 1e-5, (loss.item(), trl_loss)
    assert set(trl_metrics) == set(names) | set(NOT_COMPARED)
    assert ("log_odds_ratio" in metrics) == ("log_odds_ratio" in names)  # orpo's metrics for orpo alone
    for name in names:
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-5, rel=1e-6), name
    assert ours.keys() == trl_grads.keys()
    for name, g in trl_grads.items():
        torch.testing.assert_close(ours[name], g, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", CPO_CASES, ids=case_id)
def test_cpo_and_simpo_match_cpo_trainer(parity: SimpleNamespace, case: tuple[dict, dict]) -> None:
    """Loss, gradients and metrics of CPOTrainer.get_batch_loss_metrics; with cpo_alpha 0 TRL logs nll_loss 0
    and ours is the chosen NLL TRL computes when cpo_alpha ≠ 0."""
    args = parity.configs[case_id(case)]
    configure(parity.cpo, args)
    parity.model.zero_grad()
    loss, metrics = parity.cpo.get_batch_loss_metrics(parity.model, parity.batch)
    loss.backward()
    if args.cpo_alpha == 0:
        assert metrics["nll_loss"] == 0
        with torch.no_grad():
            metrics["nll_loss"] = masked_nll(parity, parity.batch).item()
    assert_parity(parity, case[0], loss.item(), metrics, COMPARED)


@pytest.mark.parametrize("case", ORPO_CASES, ids=case_id)
def test_orpo_matches_orpo_trainer_without_the_prompt_in_the_nll(
    parity: SimpleNamespace, case: tuple[dict, dict]
) -> None:
    """ORPOTrainer.get_batch_loss_metrics with its NLL (whole chosen sequence) swapped for the prompt-masked one:
    the odds-ratio part, rewards, logps and log_odds_* are TRL's exactly; the NLL is TRL's cross-entropy on
    the chosen completion, and TRL's own NLL really differs."""
    configure(parity.orpo, parity.configs[case_id(case)])
    parity.model.zero_grad()
    loss, metrics = parity.orpo.get_batch_loss_metrics(parity.model, parity.batch)
    full_nll = parity.orpo.concatenated_forward(parity.model, parity.batch)[4]
    nll = masked_nll(parity, parity.batch)
    assert metrics["nll_loss"] == pytest.approx(full_nll.item(), abs=1e-6)
    assert abs(full_nll.item() - nll.item()) > 1e-2  # the prompt tokens count in TRL's
    loss = loss - full_nll + nll
    loss.backward()
    metrics["nll_loss"] = nll.item()
    assert_parity(parity, case[0], loss.item(), metrics, ORPO_COMPARED)


def test_alphapo_on_summed_logps_stays_finite_where_trl_overflows(parity: SimpleNamespace) -> None:
    """cpo with alphapo_alpha on long completions: TRL's p^{−α} with p = e^{logps} is 0^{−α} = inf once
    logps < −104 (float32), so its loss is not finite; ours (e^{−α·logps}) is finite, with finite gradients, and
    equals TRL's own cpo_loss run in float64 on TRL's log-probs (plus its NLL, cpo_alpha 1)."""
    configure(parity.cpo, parity.configs[case_id(LONG_CASE)])
    with torch.no_grad():
        trl_loss, _ = parity.cpo.get_batch_loss_metrics(parity.model, parity.long_batch)
        chosen, rejected, _, _, nll = parity.cpo.concatenated_forward(parity.model, parity.long_batch)
        losses, chosen_rewards, rejected_rewards = parity.cpo.cpo_loss(chosen.double(), rejected.double())
    assert chosen.max() < -104 and rejected.max() < -104
    assert not torch.isfinite(trl_loss)

    loss, metrics, ours = our_step(parity, LONG_CASE[0], parity.long_pairs)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in ours.values())
    assert loss.item() == pytest.approx(losses.mean().item() + nll.item(), rel=1e-5)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), rel=1e-5)
