"""Cost curves over data size: wall time and peak memory of each CLI stage at several numbers of pairs.

    .venv/bin/python bench/bench_scale.py --sizes 5000,20000,60000 --out bench/results_scale.json

For each size, generated pairs (seeded; standard text rows, ~2 x 250 tokens per pair) go through the three CLI
stages `tokenize`, `score-ref` and `train` (2 workers x 1 CPU, ZeRO-2, --max-steps steps of 8 pairs per
worker, no eval), each stage in a fresh process with its own local Ray, through `stages.cli.main`. The model is
a tiny random Llama (hidden 32, 1 layer) over a word-level vocabulary of 503 tokens, so the forward and
backward cost almost nothing: what grows with the data is the pipeline's own work (reading, tokenizing, Ray
Data, the merge into the training table, checksums) and its memory.

Measured per stage, by a thread in the stage's process that samples every 0.2 s:
  wall            seconds in `stages.cli.main` (Ray already started; its start-up is recorded apart);
  CPU             the driver's CPU seconds in `stages.cli.main` plus the lifetime CPU seconds of every Ray
                  worker process (idle ones included): less sensitive than wall time to other load;
  driver          peak RSS (VmHWM of the process) and peak RssAnon (its heap: no mapped files, no object store);
  workers         sum over the Ray worker processes that ran something in the stage (title other than
                  ray::IDLE; Ray Data's own actors included) of each one's peak RssAnon; for `train`, the
                  sum of `worker_private_memory_bytes` from train_summary.json (each rank's peak RssAnon,
                  measured in the worker itself);
  object store    peak `object_store_bytes_used` of the raylet (what `ray memory --stats-only` reads).
Also: the training table's file size and the time the train stage spent building it (its printed line).
The acceptance number is (summed worker private peak at the largest size - at the smallest) / (table bytes
at the largest size - at the smallest), which should be at most 0.25.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tokenize", "score-ref", "train")
VOCAB_WORDS = 500  # plus <pad>, <eos>, <unk>
PROMPT_WORDS = (100, 200)  # uniform, inclusive: 150 on average
COMPLETION_WORDS = (50, 150)  # 100 on average, so ~251 tokens per sequence with EOS
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
TABLE_LINE = re.compile(r"training table of (\d+) pairs in \d+ file\(s\) -> (\S+) in ([\d.]+)s")
MB = 1e6


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p.add_argument("--sizes", default="5000,20000,60000", help="numbers of pairs, comma-separated")
    p.add_argument("--max-steps", type=int, default=20, help="optimizer steps of the train stage (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated pairs and the model")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
    p.add_argument("--out", default="bench/results_scale.json", help="JSON results file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args()


# --- setup: tokenizer, model, generated pairs ---


def build_model(work: Path, seed: int, name: str = "model", **arch: int) -> Path:
    """A word-level tokenizer (w0 .. w499, <pad>, <eos>, <unk>) and a random Llama over it, saved together; `arch`
    overrides the tiny default shape (`make_tiny_model`'s keywords)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import make_tiny_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(VOCAB_WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    shape = {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64} | arch
    return make_tiny_model(work / name, tokenizer, seed=seed, **shape)


def write_pairs(path: Path, n: int, seed: int) -> dict[str, int]:
    """n standard-text rows; the first n of one seeded stream, so a smaller size is a prefix of a larger one.
    Prompts of 100-200 words, chosen and rejected completions of 50-150 words each (one token per word)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(VOCAB_WORDS)], dtype=object)
    tokens = 0
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(n):
            lp, lc, lr = (
                int(rng.integers(lo, hi + 1)) for lo, hi in (PROMPT_WORDS, COMPLETION_WORDS, COMPLETION_WORDS)
            )
            prompt, chosen, rejected = (" ".join(words[rng.integers(0, VOCAB_WORDS, k)]) for k in (lp, lc, lr))
            fh.write(json.dumps({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}) + "\n")
            tokens += 2 * lp + lc + lr + 2  # + EOS on each side
    return {"pairs": n, "tokens": tokens, "bytes": path.stat().st_size}


def stage_config(run: Path, model_dir: Path, data: Path, max_steps: int) -> Path:
    cfg = {
        "model": str(model_dir),
        "dataset": [str(data)],
        "cache_dir": str(run / "cache"),
        "output_dir": str(run / "out"),
        "max_length": 1024,  # nothing is truncated
        "num_workers": 2,
        "cpus_per_worker": 1,
        "zero_stage": 2,
        "max_steps": max_steps,
        "per_device_train_batch_size": 8,
        "logging_steps": 10,
        "gradient_checkpointing": False,
        "seed": 42,
    }
    path = run / "config.yaml"
    path.write_text(json.dumps(cfg, indent=2) + "\n")  # JSON is YAML
    return path


# --- the child: one CLI stage in a fresh process, sampled ---


def read_status(pid: int | str) -> dict[str, int]:
    """VmRSS, VmHWM and RssAnon of a process, in bytes (empty if it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                out[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return out


class Sampler(threading.Thread):
    """Every `interval` s: this process's RSS and RssAnon, each Ray worker process's RssAnon (the processes
    that this driver's local Ray started: descendants of this process titled ray::...), and the object store's
    bytes in use as the raylet reports them."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval = interval
        self.stop_event = threading.Event()
        self.driver_anon_peak = 0
        self.driver_rss_peak = 0
        self.workers: dict[int, dict[str, Any]] = {}
        self.active_sum_peak = 0  # largest sum at one instant over the processes active so far
        self.store_peak = 0
        self.store_last: dict[str, float] = {}
        self.samples = 0
        self.state: Any = None

    def watch_ray(self) -> None:
        import ray
        from ray._private import internal_api

        self.state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop_event.wait(self.interval):
            self.sample(me)

    def sample(self, me: Any) -> None:
        s = read_status("self")
        self.driver_anon_peak = max(self.driver_anon_peak, s.get("RssAnon", 0))
        self.driver_rss_peak = max(self.driver_rss_peak, s.get("VmRSS", 0))
        for p in me.children(recursive=True):
            try:
                cmd = p.cmdline()
            except Exception:  # gone, or a zombie
                continue
            title = cmd[0].strip() if cmd else ""
            if not title.startswith("ray::") or title in RAY_AGENTS:
                continue
            st = read_status(p.pid)
            w = self.workers.setdefault(p.pid, {"anon_peak": 0, "rss_peak": 0, "titles": set(), "cpu_s": 0.0})
            with contextlib.suppress(Exception):
                w["cpu_s"] = sum(p.cpu_times()[:2])  # user + system over the process's life so far
            w["anon_peak"] = max(w["anon_peak"], st.get("RssAnon", 0))
            w["rss_peak"] = max(w["rss_peak"], st.get("VmRSS", 0))
            w["anon_now"] = st.get("RssAnon", 0)
            w["titles"].add(re.sub(r"\)\.\w+$", ")", title))  # MapWorker(...).__init__ -> MapWorker(...)
        now = sum(w["anon_now"] for w in self.workers.values() if self.active(w))
        self.active_sum_peak = max(self.active_sum_peak, now)
        if self.state is not None:
            from ray._private import internal_api

            try:
                stats = internal_api.get_memory_info_reply(self.state, timeout_seconds=5).store_stats
                self.store_peak = max(self.store_peak, stats.object_store_bytes_used)
                self.store_last = {
                    "spilled_bytes_total": stats.spilled_bytes_total,
                    "cumulative_created_bytes": stats.cumulative_created_bytes,
                }
            except Exception:  # the raylet is stopping
                pass
        self.samples += 1

    @staticmethod
    def active(w: dict[str, Any]) -> bool:
        return any(t != "ray::IDLE" for t in w["titles"])

    def finish(self) -> dict[str, Any]:
        import psutil

        self.stop_event.set()
        self.join()
        self.sample(psutil.Process())  # the last CPU times, before Ray stops
        active = [w for w in self.workers.values() if self.active(w)]
        titles: dict[str, dict[str, int]] = {}  # per kind of process: how many, and their summed peak RssAnon
        for w in active:
            name = sorted(t for t in w["titles"] if t != "ray::IDLE")[0]
            kind = titles.setdefault(name, {"processes": 0, "private_peak_sum": 0})
            kind["processes"] += 1
            kind["private_peak_sum"] += w["anon_peak"]
        return {
            "driver_rss_peak_sampled": self.driver_rss_peak,
            "driver_anon_peak": self.driver_anon_peak,
            "workers_active": len(active),
            "workers_all": len(self.workers),
            "workers_private_peak_sum": sum(w["anon_peak"] for w in active),
            "workers_private_peak_sum_all": sum(w["anon_peak"] for w in self.workers.values()),
            "workers_private_sum_peak_at_once": self.active_sum_peak,
            "workers_private_peak_by_title": titles,
            "workers_private_peaks": [
                {"title": sorted(t for t in w["titles"] if t != "ray::IDLE")[0], "private_peak": w["anon_peak"]}
                for w in active
            ],
            "workers_cpu_s": sum(w["cpu_s"] for w in self.workers.values()),
            "object_store_peak": self.store_peak,
            **self.store_last,
            "samples": self.samples,
        }


def child(spec: dict[str, Any]) -> None:
    """Run one CLI stage (`spec["argv"]`) and write its measurements to spec["result"]."""
    sampler = Sampler()
    sampler.start()
    import ray

    from pipeline.cluster import init_ray
    from stages import cli

    start = time.perf_counter()
    init_ray()  # the CLI would start the same local Ray; started here so that its start-up is timed apart
    ray_start_s = time.perf_counter() - start
    ray.data.DataContext.get_current().enable_progress_bars = False
    sampler.watch_ray()
    start, cpu = time.perf_counter(), os.times()
    rc = cli.main(spec["argv"])
    wall_s = time.perf_counter() - start
    driver_cpu_s = sum(os.times()[:2]) - sum(cpu[:2])
    driver_hwm = read_status("self").get("VmHWM", 0)
    measured = sampler.finish()
    ray.shutdown()
    result = {
        "rc": rc,
        "wall_s": wall_s,
        "ray_start_s": ray_start_s,
        "driver_rss_peak": driver_hwm,
        "driver_cpu_s": driver_cpu_s,
        **measured,
        "cpu_s": driver_cpu_s + measured["workers_cpu_s"],
        "loadavg_after": os.getloadavg(),
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")


def run_stage(stage: str, config: Path, run: Path, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    spec = {"argv": [stage, "--config", str(config)], "result": str(run / f"{stage}.json")}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a fresh local Ray
    env |= {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env |= extra_env or {}
    log = run / f"{stage}.log"
    with log.open("w") as fh:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
    result = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).exists() else {}
    if proc.returncode != 0 or result.get("rc") != 0:
        raise SystemExit(f"{stage} failed (exit {proc.returncode}); last lines of {log}:\n{log.read_text()[-4000:]}")
    result["log"] = str(log)
    return result


# --- one size: three stages, then what they left in the cache ---


def run_size(work: Path, model_dir: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    data = work / f"pairs-{n}.jsonl"
    generated = write_pairs(data, n, args.seed)
    run = work / f"n{n}"
    shutil.rmtree(run, ignore_errors=True)  # a fresh cache: every stage does its work
    run.mkdir(parents=True)
    config = stage_config(run, model_dir, data, args.max_steps)
    stages = {}
    for stage in STAGES:
        stages[stage] = run_stage(stage, config, run)
        s = stages[stage]
        print(
            f"[bench] {n} pairs, {stage}: {s['wall_s']:.1f}s, driver {s['driver_rss_peak'] / MB:.0f} MB, "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    summary = json.loads((run / "out" / "train_summary.json").read_text())
    private = summary["worker_private_memory_bytes"]
    stages["train"]["workers_private_peak_sum_sampled"] = stages["train"]["workers_private_peak_sum"]
    stages["train"]["workers_private_peak_sum"] = sum(private)
    stages["train"]["worker_private_memory_bytes"] = private
    table_files = glob.glob(str(run / "cache" / "table" / "*" / "*.arrow"))
    assert len({Path(f).parent for f in table_files}) == 1, table_files  # one table: the train split's
    match = TABLE_LINE.search(Path(stages["train"]["log"]).read_text())
    manifest = json.loads((Path(table_files[0]).parent / "manifest.json").read_text())
    return {
        "pairs": n,
        "data": generated,
        "pairs_kept": manifest["rows"],
        "table_bytes": sum(os.path.getsize(f) for f in table_files),
        "build_table_s": float(match.group(3)) if match else None,
        "build_table_merge_s": manifest.get("timings", {}).get("merge_s"),
        "tokenized_bytes": dir_bytes(run / "cache" / "tokenized"),
        "reference_bytes": dir_bytes(run / "cache" / "reference"),
        "train_summary": {k: summary[k] for k in ("train_runtime", "train_steps", "peak_memory_bytes", "num_workers")},
        "stages": stages,
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --- growth and the report ---

METRICS = (
    ("wall_s", "wall s", 1.0),
    ("cpu_s", "CPU s", 1.0),
    ("driver_rss_peak", "driver RSS MB", MB),
    ("driver_anon_peak", "driver anon MB", MB),
    ("workers_private_peak_sum", "workers private MB", MB),
    ("object_store_peak", "object store MB", MB),
)


def growth(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Between consecutive sizes, per stage and metric: the ratio, the log-log exponent (1 = linear, 0 = flat,
    above 1 = superlinear) and the marginal cost per 1,000 pairs."""
    out: dict[str, Any] = {}
    for a, b in itertools.pairwise(runs):
        key = f"{a['pairs']}->{b['pairs']}"
        n_ratio = b["pairs"] / a["pairs"]
        rows: dict[str, Any] = {"pairs_ratio": n_ratio}
        values = [
            (f"{stage}.{m}", a["stages"][stage][m], b["stages"][stage][m]) for stage in STAGES for m, _, _ in METRICS
        ]
        values += [(x, a[x], b[x]) for x in ("table_bytes", "build_table_s")]
        for name, va, vb in values:
            if not va or vb is None:
                continue
            rows[name] = {
                "ratio": vb / va,
                "exponent": math.log(vb / va) / math.log(n_ratio) if vb > 0 else None,
                "per_1000_pairs": (vb - va) / (b["pairs"] - a["pairs"]) * 1000,
            }
        out[key] = rows
    return out


def acceptance(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Summed worker private peak of training: its growth over the table's growth, smallest to largest size."""
    a, b = runs[0], runs[-1]
    d_private = b["stages"]["train"]["workers_private_peak_sum"] - a["stages"]["train"]["workers_private_peak_sum"]
    d_table = b["table_bytes"] - a["table_bytes"]
    return {
        "from_pairs": a["pairs"],
        "to_pairs": b["pairs"],
        "workers_private_sum_bytes": [
            a["stages"]["train"]["workers_private_peak_sum"],
            b["stages"]["train"]["workers_private_peak_sum"],
        ],
        "table_bytes": [a["table_bytes"], b["table_bytes"]],
        "ratio": d_private / d_table if d_table else None,
        "limit": 0.25,
        "passed": d_table > 0 and d_private / d_table <= 0.25,
    }


def print_report(runs: list[dict[str, Any]], grown: dict[str, Any], accept: dict[str, Any]) -> None:
    head = f"{'pairs':>7} {'stage':<10}" + "".join(f"{label:>20}" for _, label, _ in METRICS)
    print("\n" + head + "\n" + "-" * len(head))
    for r in runs:
        for stage in STAGES:
            s = r["stages"][stage]
            print(f"{r['pairs']:>7} {stage:<10}" + "".join(f"{s[m] / scale:>20.1f}" for m, _, scale in METRICS))
        print(
            f"{'':>7} {'table':<10} {r['table_bytes'] / MB:.1f} MB, built in {r['build_table_s']}s "
            f"(tokenized {r['tokenized_bytes'] / MB:.1f} MB, reference {r['reference_bytes'] / MB:.1f} MB)"
        )
    print("\nlog-log growth exponent between consecutive sizes (1 = linear, 0 = flat, > 1 = superlinear)")
    print(f"{'step':<36}" + "".join(f"{k:>16}" for k in grown))
    names = sorted({n for rows in grown.values() for n in rows if n != "pairs_ratio"}, key=_order)
    for name in names:
        cells = []
        for rows in grown.values():
            e = rows.get(name, {}).get("exponent")
            cells.append(f"{e:>16.2f}" if e is not None else f"{'-':>16}")
        print(f"{name:<36}" + "".join(cells))
    total = {stage: runs[-1]["stages"][stage]["wall_s"] for stage in STAGES}
    share = ", ".join(f"{s} {t:.0f}s ({t / sum(total.values()):.0%})" for s, t in total.items())
    print(f"\nwall time at {runs[-1]['pairs']} pairs: {share}")
    print(
        f"acceptance: workers' summed private peak {accept['workers_private_sum_bytes'][0] / MB:.0f} -> "
        f"{accept['workers_private_sum_bytes'][1] / MB:.0f} MB for a table {accept['table_bytes'][0] / MB:.1f} -> "
        f"{accept['table_bytes'][1] / MB:.1f} MB: ratio {accept['ratio']:.3f} (limit 0.25): "
        f"{'PASS' if accept['passed'] else 'FAIL'}"
    )


def _order(name: str) -> tuple[int, int]:
    stage = name.split(".")[0]
    metric = name.split(".")[-1]
    metrics = [m for m, _, _ in METRICS]
    return (STAGES.index(stage) if stage in STAGES else 3, metrics.index(metric) if metric in metrics else 9)


def machine(load_before: tuple[float, ...]) -> dict[str, Any]:
    import ray
    import torch
    import transformers

    cpu = next(
        (
            x.split(":", 1)[1].strip()
            for x in Path("/proc/cpuinfo").read_text().splitlines()
            if x.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


# --- main ---


def main() -> None:
    args = parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    sizes = sorted(int(x) for x in args.sizes.split(","))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    print(f"[bench] sizes {sizes}, work {work}, load average {load_before}", flush=True)
    model_dir = build_model(work, args.seed)

    runs = [run_size(work, model_dir, n, args) for n in sizes]

    grown = growth(runs)
    accept = acceptance(runs)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(load_before),
        "wall_s": time.perf_counter() - started,
        "setup": {
            "model": "random Llama, hidden 32, 1 layer, 4/2 heads, MLP 64, word-level vocab 503, float32",
            "train": f"2 workers x 1 CPU, ZeRO-2, {args.max_steps} steps x 8 pairs per worker, no eval",
            "prompt_words": PROMPT_WORDS,
            "completion_words": COMPLETION_WORDS,
            "seed": args.seed,
        },
        "runs": runs,
        "growth": grown,
        "acceptance": accept,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(runs, grown, accept)
    print(f"[bench] {report['wall_s']:.0f}s in all; results written to {out}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
