"""Reference-free losses end to end through `dpo-pipeline run` on a real local Ray and DeepSpeed.

A run of simpo alone must never reach stage 2: its reference model is a corrupt copy that would fail to load
(stage 4 answers with the starting policy instead), stage 2's entry point is replaced by one that fails, and
the cache must end with no reference entry. Its
held-out metrics at step 0 and after training equal SimPO's formula computed here, one pair at a time in
float64, from the initial and the exported policy. A mixed run (sigmoid + simpo) scores the reference once
and trains from the cached scores: at step 0 its eval loss is ln 2 plus the weighted SimPO value.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stages.cli import main

LN2 = math.log(2.0)
WORDS = ["red", "blue", "green", "gold", "black", "white", "pink", "grey"]
EVAL = [(f"Which colour is {i}?", f" {WORDS[i % 8]}", f" not {WORDS[i % 8]} at all") for i in range(6)]
SIMPO = {"cpo_beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 1.0}


@pytest.fixture(scope="module")
def data(ray_session, tiny_model_dir, tmp_path_factory) -> Path:
    """Train (24 pairs) and eval (6 pairs) JSONL files, and a reference model whose weights are corrupt."""
    root = tmp_path_factory.mktemp("reffree")
    train = [
        {"prompt": f"Name colour number {i}:", "chosen": f" {WORDS[i % 8]} {i}", "rejected": f" {WORDS[(i + 3) % 8]}"}
        for i in range(24)
    ]
    evals = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in EVAL]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    corrupt = shutil.copytree(tiny_model_dir, root / "corrupt-ref")
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    return root


def run(root: Path, tiny_model_dir: Path, name: str, command: str = "run", **over) -> tuple[int, Path]:
    cfg = {
        "model": str(tiny_model_dir),
        "cache_dir": str(root / "cache"),
        "dataset": [str(root / "train.jsonl")],
        "eval_dataset": [str(root / "eval.jsonl")],
        "output_dir": str(root / name),
        "run_name": name,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "logging_steps": 1,
        "zero_stage": 0,
        "num_workers": 1,
        "gradient_checkpointing": False,
        **over,
    }
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return main([command, "--config", str(path)]), root / name


def metrics(out: Path) -> tuple[dict, dict]:
    """(the step-0 eval line, train_summary.json)."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step0 = next(x for x in lines if "eval_loss" in x and x["step"] == 0)
    return step0, json.loads((out / "train_summary.json").read_text())


def completion_logps(model_dir: Path | str) -> tuple[list[float], list[float], list[int], list[int]]:
    """Per eval pair: Σ log π of the chosen / rejected completion tokens (EOS included) and their counts,
    float64, one unpadded sequence at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    sums: dict[str, list[float]] = {"c": [], "r": []}
    counts: dict[str, list[int]] = {"c": [], "r": []}
    for prompt, chosen, rejected in EVAL:
        start = len(tok(prompt)["input_ids"])
        for side, completion in (("c", chosen), ("r", rejected)):
            ids = tok(prompt + completion + tok.eos_token)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            sums[side].append(sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids))))
            counts[side].append(len(ids) - start)
    return sums["c"], sums["r"], counts["c"], counts["r"]


def simpo_eval(model_dir: Path | str) -> dict[str, float]:
    """SimPO (Meng et al. 2024) + cpo_alpha·NLL over the 6 eval pairs (one eval batch), as its metrics:
    loss = mean_b(−log σ(β(ā_w − ā_l) − γ)) + α·(−Σ log π(y_w) / Σ |y_w|), rewards β·ā, logps ā."""
    cw, cr, nw, nr = completion_logps(model_dir)
    mean_w = torch.tensor([s / n for s, n in zip(cw, nw, strict=True)], dtype=torch.float64)
    mean_l = torch.tensor([s / n for s, n in zip(cr, nr, strict=True)], dtype=torch.float64)
    beta, gamma, alpha = SIMPO["cpo_beta"], SIMPO["simpo_gamma"], SIMPO["cpo_alpha"]
    nll = -sum(cw) / sum(nw)
    pair = -F.logsigmoid(beta * (mean_w - mean_l) - gamma)
    return {
        "pair": pair.mean().item(),
        "nll_loss": nll,
        "loss": pair.mean().item() + alpha * nll,
        "rewards/chosen": beta * mean_w.mean().item(),
        "rewards/accuracies": (mean_w > mean_l).double().mean().item(),
        "logps/chosen": mean_w.mean().item(),
        "logps_sum/chosen": sum(cw) / len(cw),
    }


def test_reference_free_run_never_touches_a_reference(data, tiny_model_dir, monkeypatch, capsys):
    def no_stage_2(*args, **kwargs):
        raise AssertionError("stage 2 was called for a reference-free run")

    monkeypatch.setattr("stages.cli.score_splits", no_stage_2)
    rc, out = run(data, tiny_model_dir, "simpo", loss_type=["simpo"], ref_model=str(data / "corrupt-ref"), **SIMPO)
    captured = capsys.readouterr()
    console = captured.out
    assert rc == 0, console + captured.err
    assert "[run] stage 2 skipped: loss_type simpo is reference-free" in console
    assert not (data / "cache" / "reference").exists()
    step0, summary = metrics(out)
    assert summary["inputs"]["train"]["reference"] is None and summary["inputs"]["eval"]["reference"] is None

    want = simpo_eval(tiny_model_dir)  # step 0: the initial policy
    for name in ("loss", "nll_loss", "rewards/chosen", "rewards/accuracies", "logps/chosen"):
        assert step0[f"eval_{name}"] == pytest.approx(want[name], abs=2e-5), name
    assert want["pair"] != pytest.approx(LN2, abs=1e-2)  # nothing here is DPO's ln 2

    final = simpo_eval(out / "final")  # after 3 steps: the exported policy
    got = summary["final_eval"]
    for name in ("loss", "nll_loss", "rewards/chosen", "logps/chosen"):
        assert got[name] == pytest.approx(final[name], abs=2e-5), name
    assert abs(final["loss"] - want["loss"]) > 1e-3  # the policy moved
    assert "no reference model (reference-free losses)" in (out / "report.md").read_text()

    rc, _ = run(data, tiny_model_dir, "simpo-score", command="score-ref", loss_type=["simpo"])
    assert rc == 0 and "[score-ref] nothing to score" in capsys.readouterr().out
    assert not (data / "cache" / "reference").exists()


def test_mixed_run_scores_once_and_trains_from_cached_scores(data, tiny_model_dir, capsys):
    mix = {"loss_type": ["sigmoid", "simpo"], "loss_weights": [1.0, 0.5], "max_new_tokens": 0}  # no stage 4
    rc, out = run(data, tiny_model_dir, "mixed", **mix, **SIMPO)
    console = capsys.readouterr()
    assert rc == 0, console.out + console.err
    step0, summary = metrics(out)
    assert Path(summary["inputs"]["train"]["reference"]).parent == data / "cache" / "reference"
    want = simpo_eval(tiny_model_dir)
    # the policy starts as the reference: sigmoid gives ln 2, rewards are β·ρ = 0, logps are sums
    assert step0["eval_loss"] == pytest.approx(LN2 + 0.5 * want["loss"], abs=2e-5)
    assert step0["eval_nll_loss"] == pytest.approx(want["nll_loss"], abs=2e-5)
    assert step0["eval_rewards/chosen"] == 0.0 and step0["eval_rewards/accuracies"] == 0.0
    assert step0["eval_logps/chosen"] == pytest.approx(want["logps_sum/chosen"], abs=1e-4)
    assert "log_odds_ratio" not in summary["final_eval"]
