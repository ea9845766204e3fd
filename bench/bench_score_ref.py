"""Benchmark stage 2 (reference scoring) on CPU against a plain in-process loop and against TRL 1.16.

    .venv/bin/python bench/bench_score_ref.py --pairs 256 --max-length 512 --repeats 3 --trl-repeats 1 \\
        --out bench/results_score_ref.json

Same random Llama (SmolLM2 tokenizer, 49k vocabulary), same stage-1 tokenized HH-RLHF pairs, same torch
threads, three ways:
  ours   `run_score_ref` on a local Ray (one actor), micro-batches of --batch-size pairs, length-grouped within
         blocks of 16 micro-batches;
  plain  the same pipeline.models.forward calls in this process, same micro-batches in the same order: what scoring
         costs without Ray, so ours / plain is the Ray overhead (target: <= 1.10);
  plain_unsorted  the same calls on TRL's batches (dataset order, no length grouping): plain_unsorted / plain
         is what length grouping buys, trl / plain_unsorted what the log-prob computation costs apart from it;
  trl    TRL 1.16 `DPOTrainer._precompute_ref_logps` (what `precompute_ref_log_probs=True` runs in the trainer's
         constructor) on the same token ids, DataLoader batches of --batch-size pairs in dataset order, use_cpu,
         bf16=False; trl / ours is the speed-up (target: > 1).

Start-up is excluded from the throughput and reported apart: tokenization, Ray start, building the TRL trainer,
and, for ours, everything before the actor's first call (Ray Data planning, reading, actor start, model load).
Our timed window runs from the first actor call to `run_score_ref` returning, so it includes Ray's block
transfers and scheduling gaps, the driver's shard writes and the manifest. Each repeat runs ours, plain, trl
in turn; the table shows medians.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HH_RLHF = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny_models, shared with the tests


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p.add_argument("--data", default=str(HH_RLHF), help="preference jsonl(.gz); default: shared HH-RLHF test")
    p.add_argument("--pairs", type=int, default=256, help="first N rows of --data (default 256)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch, all three ways (default 8)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=768)
    p.add_argument("--threads", type=int, default=2, help="torch threads = Ray CPUs (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of ours and plain (default 3)")
    p.add_argument(
        "--trl-repeats", type=int, default=1, help="timed repeats of TRL, 0 = none (default 1: it is the slow one)"
    )
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    p.add_argument("--out", default="bench/results_score_ref.json", help="JSON results file")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    import torch

    import stages.stage2_score_ref as stage2
    from pipeline.config import config_from_dict
    from pipeline.models.loading import load_causal_lm
    from stages.stage1_tokenize import run_tokenize

    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-score-ref-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    # --- setup (not timed): model, data subset, Ray, stage 1 ---
    model_dir = build_model(work, args)
    src = work / f"hh-{args.pairs}.jsonl"
    with gzip.open(args.data, "rt", encoding="utf-8") as fh, src.open("w", encoding="utf-8") as out:
        for _, line in zip(range(args.pairs), fh):
            out.write(line)
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    cfg = config_from_dict(
        {
            "model": str(model_dir),
            "cache_dir": str(work / "cache"),
            "output_dir": str(work / "out"),
            "max_length": args.max_length,
            "precompute_ref_batch_size": args.batch_size,
            "dataset": [str(src)],
        }
    )
    data = run_tokenize(cfg, (str(src),))
    rows = load_rows(data)
    n = len(rows)
    tokens = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    print(
        f"[bench] {n} pairs kept of {args.pairs} rows, {tokens} tokens ({tokens / (2 * n):.0f} per sequence, "
        f"max {max(max(len(r['chosen_input_ids']), len(r['rejected_input_ids'])) for r in rows)})",
        flush=True,
    )

    same_start = {r["pair_id"] for r in rows if r["chosen_completion_start"] == r["rejected_completion_start"]}
    plain_model = load_causal_lm(str(model_dir))
    trainer = build_trl(model_dir, work, args) if args.trl_repeats > 0 else None

    # --- timed repeats ---
    results: dict[str, list[dict]] = {"ours": [], "plain": [], "plain_unsorted": [], "trl": []}
    reference = None
    for r in range(args.repeats):
        ours, scores = run_ours(stage2, cfg, data, work / f"calls-{r}")
        results["ours"].append(ours)
        reference = reference or scores
        line = f"ours {ours['scoring_s']:.1f}s (end to end {ours['end_to_end_s']:.1f}s)"
        for way, grouped in (("plain", True), ("plain_unsorted", False)):
            plain, plain_scores = run_plain(plain_model, rows, args.batch_size, stage2.BLOCK_BATCHES, grouped)
            plain["max_abs_diff_vs_ours"] = max_diff(plain_scores, reference, set(reference))
            results[way].append(plain)
            line += f", {way} {plain['scoring_s']:.1f}s"
        if trainer is not None and r < args.trl_repeats:
            trl, trl_scores = run_trl(trainer, rows, args.batch_size, r)
            trl["max_abs_diff_vs_ours"] = max_diff(trl_scores, reference, same_start)
            results["trl"].append(trl)
            line += f", trl {trl['scoring_s']:.1f}s"
        for way in results:
            if len(results[way]) == r + 1:
                results[way][r]["loadavg_1m_after"] = os.getloadavg()[0]  # other processes on the machine
        print(f"[bench] repeat {r + 1}/{args.repeats}: {line}; load average {os.getloadavg()[0]:.1f}", flush=True)

    # --- report ---
    summary = summarize(results, n)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(load_before),
        "model": {
            "hidden_size": args.hidden_size,
            "layers": args.layers,
            "intermediate_size": args.intermediate_size,
            "vocab": plain_model.config.vocab_size,
            "parameters": sum(p.numel() for p in plain_model.parameters()),
            "dtype": "float32",
        },
        "data": {
            "source": args.data,
            "rows": args.pairs,
            "pairs": n,
            "tokens": tokens,
            "max_length": args.max_length,
            "batch_size": args.batch_size,
        },
        "runs": results,
        "summary": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(summary, n)
    print(f"[bench] results written to {out}")
    ray.shutdown()
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


# --- setup helpers ---


def build_model(work: Path, args: argparse.Namespace) -> Path:
    from tiny_models import make_tiny_model
    from transformers import AutoTokenizer

    from pipeline.models.loading import builtin_gguf, load_tokenizer

    source, gguf_file = builtin_gguf("smollm2-135m")
    AutoTokenizer.from_pretrained(source, gguf_file=gguf_file).save_pretrained(work / "tokenizer")
    tokenizer = load_tokenizer(str(work / "tokenizer"))
    return make_tiny_model(
        work / "model",
        tokenizer,
        seed=0,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=args.intermediate_size,
    )


def load_rows(data) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.ParquetDataset(data.files).read().to_pylist()  # sorted by pair_id, as the stage reads them


def build_trl(model_dir: Path, work: Path, args: argparse.Namespace):
    """A DPOTrainer with precompute_ref_log_probs=True, built on a one-row dataset (its own precompute of that
    row runs here, untimed); the timed call is its `_precompute_ref_logps` on our token ids."""
    import warnings

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    warnings.filterwarnings("ignore")
    os.environ["TQDM_DISABLE"] = "1"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32")
    config = DPOConfig(
        output_dir=str(work / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=args.batch_size,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    one = Dataset.from_dict({"prompt": ["Hi."], "chosen": [" Hello."], "rejected": [" Go away."]})
    return DPOTrainer(model=model, args=config, train_dataset=one, processing_class=tokenizer)


# --- the three ways ---


def timed_scorer(stage2, log_dir: Path):
    """The stage's actor class, leaving the start and end time of each call behind as a file name."""
    log_dir.mkdir(parents=True, exist_ok=True)

    class Timed(stage2._ScoreRef):
        def __call__(self, block):
            start = time.time()
            out = super().__call__(block)
            (log_dir / f"{start:.6f}_{time.time():.6f}_{block.num_rows}").touch()
            return out

    return Timed


def run_ours(stage2, cfg, data, log_dir: Path) -> tuple[dict, dict]:
    original = stage2._ScoreRef
    stage2._ScoreRef = timed_scorer(stage2, log_dir)
    try:
        start = time.time()
        ref = stage2.run_score_ref(cfg, data, force=True)
        end = time.time()
    finally:
        stage2._ScoreRef = original
    calls = [tuple(map(float, p.name.split("_"))) for p in log_dir.iterdir()]
    first = min(c[0] for c in calls)
    scores = {r["pair_id"]: (r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in load_rows(ref)}
    return {
        "end_to_end_s": end - start,
        "startup_s": first - start,  # Ray Data planning, reading, actor start, model load
        "scoring_s": end - first,
        "in_actor_compute_s": sum(c[1] - c[0] for c in calls),
        "actor_calls": len(calls),
        "padding_fraction": ref.manifest["padding_fraction"],
    }, scores


def run_plain(model, rows: list[dict], batch_size: int, block_batches: int, grouped: bool) -> tuple[dict, dict]:
    """The stage's micro-batches, in its order: blocks of batch_size * block_batches pairs in pair_id order,
    each sorted by length (stable), cut into micro-batches. Not grouped: consecutive pairs, as TRL batches."""
    import numpy as np
    import torch

    from pipeline.models.forward import collate_pairs, sequence_forward

    block = batch_size * block_batches
    scores, real, width_total = {}, 0, 0
    start = time.time()
    for b0 in range(0, len(rows), block):
        part = rows[b0 : b0 + block]
        lengths = [max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in part]
        order = np.argsort(lengths, kind="stable") if grouped else np.arange(len(part))
        for m0 in range(0, len(order), batch_size):
            sub = [part[i] for i in order[m0 : m0 + batch_size]]
            batch = collate_pairs({k: [r[k] for r in sub] for k in sub[0]}, 0)
            with torch.inference_mode():
                stats = sequence_forward(model, batch)
            for i, r in enumerate(sub):
                scores[r["pair_id"]] = (float(stats.logps[i]), float(stats.logps[len(sub) + i]))
            real += batch.num_tokens
            width_total += batch.input_ids.numel()
    elapsed = time.time() - start
    return {"scoring_s": elapsed, "padding_fraction": 1 - real / width_total}, scores


def run_trl(trainer, rows: list[dict], batch_size: int, repeat: int) -> tuple[dict, dict]:
    """TRL's precompute on our token ids: prompt = the shared prefix before the earlier completion start."""
    from datasets import Dataset

    columns = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "pair_id": [], "repeat": []}
    for r in rows:
        start = min(r["chosen_completion_start"], r["rejected_completion_start"])
        columns["prompt_ids"].append(r["chosen_input_ids"][:start])
        columns["chosen_ids"].append(r["chosen_input_ids"][start:])
        columns["rejected_ids"].append(r["rejected_input_ids"][start:])
        columns["pair_id"].append(r["pair_id"])
        columns["repeat"].append(repeat)  # a new fingerprint, so TRL's own cache never answers
    dataset = Dataset.from_dict(columns)
    start = time.time()
    done = trainer._precompute_ref_logps(dataset, f"bench-{repeat}", batch_size)
    elapsed = time.time() - start
    scores = dict(zip(done["pair_id"], zip(done["ref_chosen_logps"], done["ref_rejected_logps"])))
    # TRL pads each batch of pairs in dataset order to its longest sequence
    real = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    width = sum(
        2 * len(part) * max(max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in part)
        for part in (rows[i : i + batch_size] for i in range(0, len(rows), batch_size))
    )
    return {"scoring_s": elapsed, "padding_fraction": 1 - real / width}, scores


# --- reporting ---


def max_diff(scores: dict, reference: dict, pair_ids: set[str]) -> float:
    """Largest |difference| of the chosen and rejected sums over `pair_ids`."""
    return max(abs(a - b) for pid in pair_ids for a, b in zip(scores[pid], reference[pid]))


def summarize(results: dict[str, list[dict]], n: int) -> dict:
    out = {}
    for way, runs in results.items():
        if runs:
            t = statistics.median(r["scoring_s"] for r in runs)
            out[way] = {
                "scoring_s_median": t,
                "scoring_s_all": [round(r["scoring_s"], 2) for r in runs],
                "pairs_per_s": n / t,
                "padding_fraction": runs[0]["padding_fraction"],
            }
    ours = results["ours"]
    out["ours"] |= {
        "end_to_end_s_median": statistics.median(r["end_to_end_s"] for r in ours),
        "startup_s_median": statistics.median(r["startup_s"] for r in ours),
        "in_actor_compute_s_median": statistics.median(r["in_actor_compute_s"] for r in ours),
    }
    out["ray_overhead_ratio"] = out["ours"]["scoring_s_median"] / out["plain"]["scoring_s_median"]
    out["grouping_gain_ratio"] = out["plain_unsorted"]["scoring_s_median"] / out["plain"]["scoring_s_median"]
    if "trl" in out:
        out["trl_over_ours_ratio"] = out["trl"]["scoring_s_median"] / out["ours"]["scoring_s_median"]
        out["trl_over_plain_unsorted_ratio"] = (
            out["trl"]["scoring_s_median"] / out["plain_unsorted"]["scoring_s_median"]
        )
    return out


def print_table(summary: dict, n: int) -> None:
    print(f"\n{'way':<16}{'scoring s (median)':>20}{'pairs/s':>10}{'padding':>10}")
    for way in ("ours", "plain", "plain_unsorted", "trl"):
        if way in summary:
            s = summary[way]
            print(f"{way:<16}{s['scoring_s_median']:>20.2f}{s['pairs_per_s']:>10.2f}{s['padding_fraction']:>10.1%}")
    o = summary["ours"]
    print(
        f"\nours end to end {o['end_to_end_s_median']:.2f}s = start-up {o['startup_s_median']:.2f}s + scoring "
        f"{o['scoring_s_median']:.2f}s (in-actor compute {o['in_actor_compute_s_median']:.2f}s)"
    )
    print(f"Ray overhead ours/plain = {summary['ray_overhead_ratio']:.3f} (target <= 1.10)")
    print(f"length grouping: plain_unsorted / plain = {summary['grouping_gain_ratio']:.2f}x")
    if "trl_over_ours_ratio" in summary:
        print(
            f"TRL / ours = {summary['trl_over_ours_ratio']:.2f}x (target > 1); TRL / plain_unsorted = "
            f"{summary['trl_over_plain_unsorted_ratio']:.2f}x (same batches: the log-prob computation alone)"
        )


def machine(load_before: tuple[float, float, float]) -> dict:
    import ray
    import torch
    import transformers
    import trl

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "trl": trl.__version__,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


if __name__ == "__main__":
    main()
