"""Parity with trl==1.16.0 itself: TRL's DPOTrainer.compute_loss and our path (model body → hidden →
sequence_stats → dpo_loss → metrics) on the same tiny Llama, reference and collated batch must give the
same loss, gradients and logged metrics, for every loss type and a few combinations."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers renames, inside TRL

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402

from pipeline.config import LOSS_TYPES, LossConfig  # noqa: E402
from pipeline.core.logprobs import ld_logps, sequence_stats  # noqa: E402
from pipeline.core.losses import PreferenceInputs, dpo_loss  # noqa: E402
from pipeline.core.metrics import batch_metric_sums, finalize  # noqa: E402

VOCAB = 128
PAD, EOS = 0, 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
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
    model = LlamaForCausalLM(config)
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
    batch = DataCollatorForPreference(pad_token_id=PAD)(examples)

    # Cached reference scores (stage 2), chosen so that the batch's reward order differs from the policy's
    # and the aot losses really sort.
    with torch.no_grad():
        body = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logps = sequence_stats(
            body.last_hidden_state,
            model.lm_head,
            batch["input_ids"],
            batch["completion_mask"],
            torch.zeros(6, dtype=torch.long),
        ).logps
    chosen, rejected = logps.chunk(2)
    cached = {
        "ref_chosen_logps": chosen + torch.tensor([-4.0, -2.0, 5.0]),
        "ref_rejected_logps": rejected + torch.tensor([6.0, -2.7, -5.0]),
    }
    return trainer, model, ref_model, batch, cached


CASES = [
    *({"loss_type": (name,)} for name in LOSS_TYPES if name != "exo_pair"),
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


def our_loss(cfg: LossConfig, model, ref_model, batch, cached: dict | None = None):
    """Our training path; the reference is scored by the same function, or taken from `cached`."""
    ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    counts = completion[:, 1:].sum(dim=1)
    shared_len = torch.minimum(*counts.chunk(2)).repeat(2)
    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
    policy = sequence_stats(hidden, model.lm_head, ids, completion, shared_len, chunk_size=5, with_metrics=True)
    if cached is None:
        with torch.no_grad():
            ref_hidden = ref_model.model(input_ids=ids, attention_mask=attention).last_hidden_state
            ref = sequence_stats(ref_hidden, ref_model.lm_head, ids, completion, shared_len)
        ref_logps = ld_logps(ref.shared_logps, ref.tail_logps, cfg.ld_alpha).chunk(2)
    else:
        ref_logps = cached["ref_chosen_logps"], cached["ref_rejected_logps"]
    logps = ld_logps(policy.shared_logps, policy.tail_logps, cfg.ld_alpha).chunk(2)
    x = PreferenceInputs(
        policy_chosen_logps=logps[0],
        policy_rejected_logps=logps[1],
        ref_chosen_logps=ref_logps[0],
        ref_rejected_logps=ref_logps[1],
        chosen_tokens=policy.tokens.chunk(2)[0],
        rejected_tokens=policy.tokens.chunk(2)[1],
        policy_chosen_full_logps=policy.logps.chunk(2)[0],
        wpo_chosen_logps=policy.wpo_logps.chunk(2)[0],
        wpo_rejected_logps=policy.wpo_logps.chunk(2)[1],
    )
    out = dpo_loss(cfg, x)
    return out, finalize(batch_metric_sums(out, x, policy))


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def compare_with_trl(setup, case: dict, precomputed: bool) -> None:
    trainer, model, ref_model, batch, cached = setup
    cfg = LossConfig(**case)
    configure(trainer, cfg, precomputed)

    model.zero_grad()
    trl_loss = trainer.compute_loss(model, {**batch, **cached} if precomputed else batch)
    trl_loss.backward()
    trl_grads = grads(model)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}

    model.zero_grad()
    out, metrics = our_loss(cfg, model, ref_model, batch, cached if precomputed else None)
    out.loss.backward()
    ours = grads(model)

    assert abs(out.loss.item() - trl_loss.item()) < 1e-5, (out.loss.item(), trl_loss.item())
    assert set(metrics) == set(trl_metrics) | {"loss"}
    for name, value in trl_metrics.items():
        assert metrics[name] == pytest.approx(value, abs=1e-5), name
    assert metrics["loss"] == pytest.approx(trl_loss.item(), abs=1e-5)
    assert ours.keys() == trl_grads.keys()
    for name, g in trl_grads.items():
        torch.testing.assert_close(ours[name], g, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_loss_gradients_and_metrics_match_trl(setup, case):
    compare_with_trl(setup, case, precomputed=False)


@pytest.mark.parametrize(
    "case",
    [
        {"loss_type": ("aot",)},
        {"loss_type": ("aot_unpaired",), "label_smoothing": 0.2},
        {"loss_type": ("sigmoid", "sft"), "ld_alpha": 0.5},
        {"loss_type": ("sigmoid_norm",), "use_weighting": True},
        {"loss_type": ("discopop", "hinge"), "f_divergence_type": "js_divergence"},
    ],
    ids=case_id,
)
def test_cached_reference_matches_trl_precompute(setup, case):
    compare_with_trl(setup, case, precomputed=True)


def test_the_batch_exercises_the_metrics_and_the_sort(setup):
    trainer, model, ref_model, batch, cached = setup
    configure(trainer, LossConfig())
    trainer.compute_loss(model, batch)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert 0 < logged["mean_token_accuracy"] < 1
    assert 0 < logged["rewards/accuracies"] < 1
    assert logged["rewards/chosen"] != 0 and logged["rewards/margins"] != 0
    with torch.no_grad():
        sigmoid, aot = (
            our_loss(LossConfig(loss_type=(name,)), model, ref_model, batch, cached)[0].loss
            for name in ("sigmoid", "aot")
        )
    assert abs(sigmoid - aot) > 1e-3


def test_trl_sft_with_weighting_raises(setup):
    """TRL 1.16 bug: sft + use_weighting multiplies the WPO weights in place into an expanded tensor. Ours
    gives mean_b(ω_b)·sft (tests/test_losses.py); this pins TRL's behaviour so an upgrade is noticed."""
    trainer, model, ref_model, batch, _ = setup
    configure(trainer, LossConfig(loss_type=("sft",), use_weighting=True))
    with pytest.raises(RuntimeError, match="single memory location"):
        trainer.compute_loss(model, batch)
    out, _ = our_loss(LossConfig(loss_type=("sft",), use_weighting=True), model, ref_model, batch)
    assert torch.isfinite(out.loss)
