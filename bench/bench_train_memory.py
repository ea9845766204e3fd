"""Peak memory of one DPO training micro-step: our policy-only chunked path vs TRL 1.16 vs naive full logits.

    .venv/bin/python bench/bench_train_memory.py --pairs 8 --seq 512 --vocab 49152

Every mode runs in a fresh subprocess on the same random Llama (vocab 49k like SmolLM2) and the same
batch of B pairs (2B sequences, second half of each sequence is the completion), does one forward,
the sigmoid loss and the backward, and reports the peak resident memory (ru_maxrss) and the growth over
the process's memory right after loading the model(s):
- ours: model body -> `pipeline.core.logprobs.sequence_stats` (LM head on completion tokens only, in
  checkpointed chunks) -> `pipeline.core.losses.dpo_loss`, reference scores from a cache (no reference model);
- trl-precomputed: TRL 1.16 `DPOTrainer.compute_loss` with `precompute_ref_log_probs` scores in the batch;
- trl-online: the same with its default online reference model (a second model in memory);
- naive: `model(...).logits` -> log_softmax -> gather, the full [2B, T, V] logits materialised.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODES = ("ours", "trl-precomputed", "trl-online", "naive")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


def run_mode(mode: str, pairs: int, seq: int, vocab: int, hidden: int, layers: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = LlamaForCausalLM(config).train()
    ref_model = LlamaForCausalLM(config).eval() if mode == "trl-online" else None
    ids = torch.randint(2, vocab, (2 * pairs, seq))
    completion = torch.zeros_like(ids)
    completion[:, seq // 2 :] = 1
    attention = torch.ones_like(ids)
    trainer = _trl_trainer(model, ref_model, mode) if mode.startswith("trl") else None
    base = current_rss_mb()
    start = time.perf_counter()
    if mode == "ours":
        from pipeline.config import LossConfig
        from pipeline.core.logprobs import sequence_stats
        from pipeline.core.losses import PreferenceInputs, dpo_loss

        hidden_states = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
        stats = sequence_stats(hidden_states, model.lm_head, ids, completion, torch.zeros(2 * pairs, dtype=torch.long))
        zeros = torch.zeros(pairs)
        x = PreferenceInputs(
            stats.logps[:pairs], stats.logps[pairs:], zeros, zeros, stats.tokens[:pairs], stats.tokens[pairs:]
        )
        loss = dpo_loss(LossConfig(), x).loss
    elif mode == "naive":
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        seqs = (logp * completion[:, 1:]).sum(-1)
        loss = -torch.nn.functional.logsigmoid(0.1 * (seqs[:pairs] - seqs[pairs:])).mean()
    else:
        batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
        if mode == "trl-precomputed":
            batch |= {"ref_chosen_logps": torch.zeros(pairs), "ref_rejected_logps": torch.zeros(pairs)}
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "peak_rss_mb": round(rss_mb(), 1),
        "after_load_rss_mb": round(base, 1),
        "step_growth_mb": round(rss_mb() - base, 1),
        "step_seconds": round(seconds, 2),
        "loss": float(loss),
    }


def _trl_trainer(model, ref_model, mode: str):
    import tempfile

    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2, "w": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        report_to=[],
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        max_length=None,
        save_strategy="no",
        disable_tqdm=True,
        precompute_ref_log_probs=mode == "trl-precomputed",
    )
    train = Dataset.from_dict({"prompt": ["w"], "chosen": [" w"], "rejected": [" w w"]})
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train, processing_class=tokenizer)
    model.train()
    return trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=8, help="pairs per micro-batch (2x sequences)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(run_mode(a.child, a.pairs, a.seq, a.vocab, a.hidden, a.layers)))
        return
    results = []
    for mode in a.modes.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--pairs",
            str(a.pairs),
            "--seq",
            str(a.seq),
            "--vocab",
            str(a.vocab),
            "--hidden",
            str(a.hidden),
            "--layers",
            str(a.layers),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
        r = results[-1]
        print(
            f"{mode:16s} peak RSS {r['peak_rss_mb']:8.1f} MB | growth during the step {r['step_growth_mb']:8.1f} MB"
            f" | step {r['step_seconds']:6.2f} s | loss {r['loss']:.4f}",
            flush=True,
        )
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"args": vars(a), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
