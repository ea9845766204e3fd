"""Training throughput and memory: our stage 3 against TRL 1.16's DPOTrainer, on one machine, in one run.

    .venv/bin/python bench/bench_train.py --out bench/results_train.json

Same model (SmolLM2-135M, float32), same HH-RLHF pairs (from ../shared: real length spread, implicit
prompts; rows whose sequences fit max_length whole, so nobody truncates or drops), same batch size, same
torch threads, gradient checkpointing off everywhere. Each way runs in a fresh process:
  ours            `run_train` (Ray Train, 1 worker, DeepSpeed ZeRO-0), padding-free rows (the default);
  ours-padded     the same with padding_free: false (right-padded rows, SDPA masks);
  trl-precomputed DPOTrainer, precompute_ref_log_probs=True (one model in memory);
  trl-online      DPOTrainer with its default online reference model (a second model, one extra forward).
Throughput counts the optimizer steps after --warmup-steps (start-up, model load, tokenization, the first
steps excluded): pairs/s and non-pad tokens/s. Peak memory is the training process's peak RSS (our Ray
Train worker; TRL's only process).
Also: (2) reference scoring, our stage 2 against TRL's precompute (`_precompute_ref_logps`, timed inside
the trl-precomputed run) on the same pairs; (3) the model FLOP/s of our train steps as a fraction of this
machine's measured float32 matmul FLOP/s; (4) one train step's time and peak memory of our path as the
sequence length (256 -> 2048) and the vocabulary (32k -> 152k) grow, on a random SmolLM2-shaped model.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH_RLHF = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
WAYS = ("ours", "ours-padded", "trl-precomputed", "trl-online")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p.add_argument("--pairs", type=int, default=48, help="training pairs: one epoch over them (default 48)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step, every way (default 8)")
    p.add_argument("--max-length", type=int, default=512, help="longest sequence kept (default 512)")
    p.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of throughput (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads = Ray CPUs (default 2)")
    p.add_argument("--ways", default=",".join(WAYS), help="comma-separated subset of " + ", ".join(WAYS))
    p.add_argument("--seq-lengths", default="256,512,1024,2048", help="scaling: tokens per sequence")
    p.add_argument("--vocabs", default="32000,65536,131072,151936", help="scaling: vocabulary sizes")
    p.add_argument("--scaling-layers", type=int, default=8, help="layers of the scaling model (default 8)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--out", default="bench/results_train.json", help="JSON results file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-args", help=argparse.SUPPRESS)
    return p.parse_args()


# --- setup: model, rows that fit, our stages 1 and 2 ---


def select_rows(path: Path, tokenizer, n: int, max_length: int) -> list[dict]:
    """The first n rows whose chosen and rejected texts (+ EOS) fit max_length and differ."""
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row["chosen"] == row["rejected"]:
                continue
            longest = max(len(tokenizer(row[k])["input_ids"]) for k in ("chosen", "rejected")) + 1
            if longest <= max_length:
                rows.append(row)
            if len(rows) == n:
                return rows
    raise SystemExit(f"only {len(rows)} rows of {path} fit max_length {max_length}")


def base_config(work: Path, model_dir: str, args: argparse.Namespace) -> dict:
    return {
        "model": model_dir,
        "cache_dir": str(work / "cache"),
        "dataset": [str(work / "pairs.jsonl")],
        "max_length": args.max_length,
        "per_device_train_batch_size": args.batch_size,
        "precompute_ref_batch_size": args.batch_size,
        "num_train_epochs": 1.0,
        "learning_rate": 1e-6,
        "logging_steps": 1,
        "save_steps": 10_000,
        "zero_stage": 0,
        "gradient_checkpointing": False,
        "cpus_per_worker": args.threads,
        "cpus_per_ref_actor": args.threads,
    }


def score_reference(work: Path, cfg_dict: dict, threads: int) -> dict:
    """Stages 1 and 2 (stage 2 timed: item 2); leaves the cache that the training runs read."""
    import ray

    from pipeline.config import config_from_dict
    from stages.stage1_tokenize import run_tokenize
    from stages.stage2_score_ref import run_score_ref

    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = config_from_dict({**cfg_dict, "output_dir": str(work / "prep")}).with_absolute_paths()
    data = run_tokenize(cfg, cfg.data.dataset)
    start = time.perf_counter()
    ref = run_score_ref(cfg, data)
    seconds = time.perf_counter() - start
    ray.shutdown()
    return {"pairs": data.manifest["rows"], "score_s": seconds, "score_in_stage_s": ref.manifest["timings"]["score_s"]}


# --- the children: one training run each, in a fresh process ---


def child_ours(work: Path, cfg_dict: dict, padding_free: bool, threads: int) -> dict:
    import ray

    from pipeline.config import config_from_dict
    from stages.stage3_train import run_train

    out = work / ("ours" if padding_free else "ours-padded")
    cfg = config_from_dict({**cfg_dict, "output_dir": str(out), "run_name": out.name, "padding_free": padding_free})
    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    summary = run_train(cfg)
    ray.shutdown()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    # metrics.jsonl holds cumulative pairs/s since the loop started: elapsed_k = pairs_k / rate_k
    elapsed = [s["step"] * cfg.train.per_device_train_batch_size / s["pairs_per_second"] for s in steps]
    return {
        "elapsed_s": elapsed,
        "tokens": [s["num_tokens"] for s in steps],
        "losses": [s["loss"] for s in steps],
        "peak_rss_bytes": summary["peak_memory_bytes"],
        "batch_size": cfg.train.per_device_train_batch_size,
    }


def child_trl(work: Path, cfg_dict: dict, precompute: bool, threads: int) -> dict:
    import warnings

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    rows = [json.loads(x) for x in (work / "pairs.jsonl").read_text().splitlines()]
    model_dir = cfg_dict["model"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = None if precompute else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    times: list[float] = []
    scoring: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            times.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **k):
        start = time.perf_counter()
        out = original(self, *a, **k)
        scoring.append(time.perf_counter() - start)
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute
    config = DPOConfig(
        output_dir=str(work / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=cfg_dict["per_device_train_batch_size"],
        num_train_epochs=1,
        learning_rate=cfg_dict["learning_rate"],
        max_length=cfg_dict["max_length"],
        gradient_checkpointing=False,
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=cfg_dict["per_device_train_batch_size"],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=42,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=ref,
        args=config,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows),
        callbacks=[StepClock()],
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "elapsed_s": [t - times[0] for t in times[1:]],
        "tokens": [h["num_tokens"] for h in logs],
        "losses": [h["loss"] for h in logs],
        "precompute_s": scoring[0] if scoring else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "batch_size": cfg_dict["per_device_train_batch_size"],
    }


def child_step(seq: int, vocab: int, layers: int, threads: int) -> dict:
    """Two optimizer steps of our path on one pair of `seq`-token sequences (prompt = first half); the second
    is timed. A random Llama shaped like SmolLM2-135M (hidden 576, 9 heads / 3 KV, MLP 1536)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.config import ModelConfig
    from pipeline.models.forward import collate_pairs, sequence_forward
    from pipeline.models.kernels import choose_kernels

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    kernels = choose_kernels(ModelConfig(), cuda=False, dtype="float32")
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        attn_implementation=kernels.attn_implementation,
    )
    model = LlamaForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(0, vocab, (2, seq)).tolist()
    batch = collate_pairs(
        {
            "chosen_input_ids": [ids[0]],
            "rejected_input_ids": [ids[1]],
            "chosen_completion_start": [seq // 2],
            "rejected_completion_start": [seq // 2],
        },
        0,
    )
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        stats = sequence_forward(model, batch, padding_free=True)
        loss = -torch.nn.functional.logsigmoid(0.1 * (stats.logps[0] - stats.logps[1]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return {
        "seq": seq,
        "vocab": vocab,
        "step_s": seconds[-1],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def run_child(name: str, payload: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--child-args", json.dumps(payload)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- measurements in this process ---


def matmul_flops(threads: int, n: int = 2048, seconds: float = 5.0) -> float:
    """float32 dense matmul FLOP/s: the practical ceiling of this CPU."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def train_step_flops(model_dir: str, cfg_dict: dict, work: Path, steps: range) -> float:
    """Model FLOPs of our optimizer steps `steps` (0-based), from the pure schedule: 6 x matmul parameters x
    tokens for the body, 6 x hidden x vocab per scored completion token (the LM head only sees those), and
    causal attention 6 x L^2 x width per sequence and layer (QK^T and AV, half of each is masked)."""
    import pyarrow.parquet as pq
    from transformers import AutoConfig

    from pipeline.config import config_from_dict
    from pipeline.core.packing import scored_tokens
    from pipeline.data.entries import find_tokenized
    from pipeline.data.pairs import PairTable

    cfg = config_from_dict({**cfg_dict, "output_dir": str(work / "ours")}).with_absolute_paths()
    pairs = PairTable.from_batches([pq.read_table(f) for f in find_tokenized(cfg, cfg.data.dataset).files])
    schedule = pairs.schedule(cfg, 1)
    c = AutoConfig.from_pretrained(model_dir)
    head_dim = c.hidden_size // c.num_attention_heads
    per_layer = (
        c.hidden_size * head_dim * (c.num_attention_heads * 2 + c.num_key_value_heads * 2)
        + 3 * c.hidden_size * c.intermediate_size
    )
    width = c.num_attention_heads * head_dim
    total = 0.0
    for step in steps:
        rows = pairs.rows(schedule.step_batches(step)[0])
        for side in ("chosen", "rejected"):
            for ids, start in zip(rows[f"{side}_input_ids"], rows[f"{side}_completion_start"]):
                length = len(ids)
                total += 6 * c.num_hidden_layers * (per_layer * length + length * length * width)
                total += 6 * c.hidden_size * c.vocab_size * scored_tokens(length, start)
    return total


def rates(run: dict, warmup: int) -> dict:
    """Steady-state pairs/s and non-pad tokens/s over the steps after `warmup`."""
    t, tokens = run["elapsed_s"], run["tokens"]
    steps = len(t) - warmup
    seconds = t[-1] - t[warmup - 1]
    return {
        "steps_timed": steps,
        "seconds": seconds,
        "pairs_per_s": steps * run["batch_size"] / seconds,
        "tokens_per_s": (tokens[-1] - tokens[warmup - 1]) / seconds,
        "peak_rss_gb": run["peak_rss_bytes"] / 1e9,
        "first_loss": run["losses"][0],
    }


# --- main ---


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    if args.child:
        payload = json.loads(args.child_args)
        work = Path(payload.pop("work", "."))
        result = {
            "ours": lambda: child_ours(work, payload["cfg"], True, payload["threads"]),
            "ours-padded": lambda: child_ours(work, payload["cfg"], False, payload["threads"]),
            "trl-precomputed": lambda: child_trl(work, payload["cfg"], True, payload["threads"]),
            "trl-online": lambda: child_trl(work, payload["cfg"], False, payload["threads"]),
            "step": lambda: child_step(**payload),
        }[args.child]()
        print(json.dumps(result))
        return

    from transformers import AutoTokenizer

    from pipeline.models.loading import resolve_model

    load_before = os.getloadavg()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model("smollm2-135m", ROOT / ".cache" / "dpo-pipeline")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = select_rows(HH_RLHF, tokenizer, args.pairs, args.max_length)
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = base_config(work, model_dir, args)
    results: dict = {"command": " ".join(["python", *sys.argv]), "args": vars(args)}

    print(
        f"[bench] {len(rows)} HH-RLHF pairs, SmolLM2-135M float32, {args.threads} threads; scratch {work}", flush=True
    )
    results["ours_scoring"] = score_reference(work, cfg, args.threads)
    print(f"[bench] our reference scoring: {results['ours_scoring']['score_s']:.1f}s", flush=True)
    results["runs"] = {}
    for way in args.ways.split(","):
        run = run_child(way, {"work": str(work), "cfg": cfg, "threads": args.threads})
        results["runs"][way] = run | rates(run, args.warmup_steps)
        r = results["runs"][way]
        print(
            f"[bench] {way}: {r['pairs_per_s']:.3f} pairs/s, {r['tokens_per_s']:.0f} tokens/s, peak "
            f"{r['peak_rss_gb']:.2f} GB, first loss {r['first_loss']:.4f}",
            flush=True,
        )

    peak = matmul_flops(args.threads)
    results["matmul_flops"] = peak
    if "ours" in results["runs"]:
        ours = results["runs"]["ours"]
        steps = range(args.warmup_steps, len(ours["elapsed_s"]))
        achieved = train_step_flops(model_dir, cfg, work, steps) / ours["seconds"]
        results["ours_flops"] = {"achieved": achieved, "fraction_of_matmul": achieved / peak}
        print(
            f"[bench] our train steps: {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.1%} of matmul "
            f"{peak / 1e9:.1f} GFLOP/s",
            flush=True,
        )

    results["scaling"] = []
    points = [(int(s), 49152) for s in args.seq_lengths.split(",") if s] + [
        (512, int(v)) for v in args.vocabs.split(",") if v
    ]
    for seq, vocab in points:
        r = run_child("step", {"seq": seq, "vocab": vocab, "layers": args.scaling_layers, "threads": args.threads})
        results["scaling"].append(r)
        print(
            f"[bench] step at seq {seq}, vocab {vocab}: {r['step_s']:.2f}s, peak {r['peak_rss_bytes'] / 1e9:.2f} GB",
            flush=True,
        )

    results["machine"] = machine(load_before)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results)


def print_summary(results: dict) -> None:
    runs = results["runs"]
    print(f"\n{'way':<17}{'pairs/s':>9}{'tokens/s':>10}{'peak GB':>9}")
    for way, r in runs.items():
        print(f"{way:<17}{r['pairs_per_s']:>9.3f}{r['tokens_per_s']:>10.0f}{r['peak_rss_gb']:>9.2f}")
    if "ours" in runs:
        for other, target in (("trl-online", 2.0), ("trl-precomputed", 1.3), ("ours-padded", None)):
            if other in runs:
                ratio = runs["ours"]["pairs_per_s"] / runs[other]["pairs_per_s"]
                print(f"ours / {other}: {ratio:.2f}x pairs/s" + (f" (target >= {target})" if target else ""))
    pre = runs.get("trl-precomputed", {}).get("precompute_s")
    if pre:
        print(
            f"reference scoring: TRL precompute {pre:.1f}s / ours {results['ours_scoring']['score_s']:.1f}s = "
            f"{pre / results['ours_scoring']['score_s']:.2f}x"
        )


def machine(load_before: tuple[float, float, float]) -> dict:
    import torch

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
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


if __name__ == "__main__":
    main()
