"""Worker memory over model size: does ZeRO-3 keep each rank at its share of the weights, load and export included?

    .venv/bin/python bench/bench_model_size.py --out bench/results_model_size.json

Two random Llama models over a word-level vocabulary (so the layers, not the embedding, make the size): `small`
(hidden 512, 6 layers, MLP 2048: ~24M parameters) and `large` (hidden 1024, 24 layers, MLP 4096: ~378M), float32.
For each, the three CLI stages run in fresh processes with their own local Ray (`bench_scale.run_stage`): tokenize
and score-ref 32 short pairs, then `train` with LoRA (r 8 on q and v) under ZeRO-3 on 2 workers x 1 CPU, 2 steps
of 2 pairs per worker, gradient checkpointing, a checkpoint at step 2, the final export (adapter and merged/).

Measured: each train worker's peak private memory (RssAnon: its heap, not the page cache of the memory-mapped
weights and table), sampled every 0.2 s from outside over the whole command — start-up, load, steps, checkpoint,
export — with glibc's mmap threshold fixed (MALLOC_ENV) and DeepSpeed's gathered-parameter window scaled down
to the models (`zero3_max_live_parameters`, LIVE_PARAMETERS). The acceptance number is the slope of the larger
worker peak against the model's bytes, small to large: (peak_large - peak_small) / (bytes_large - bytes_small),
at most 0.6. Each worker holding a whole copy at any moment gives 1 or more; sharded, it is about 1/2 (its
partition) plus what the gathered-parameter window holds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import MB, build_model, machine, run_stage

SIZES = {
    "small": {"hidden_size": 512, "num_layers": 6, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 2048},
    "large": {"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "num_kv_heads": 8, "intermediate_size": 4096},
}
SLOPE_LIMIT = 0.6
# DeepSpeed keeps up to 1e9 parameters gathered by default: more than either model here, which it would then hold
# whole during a step (as it may hold 1e9 of a 70B model's). The window is scaled down with the models.
LIVE_PARAMETERS = 10_000_000
# glibc's malloc keeps freed blocks below its (self-raising) mmap threshold in the heap, so RssAnon would count
# every gathered tensor ever freed: a fixed threshold returns freed tensors to the system and RssAnon measures
# what is held.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
TRAIN_TITLE = "RayTrainWorker"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p.add_argument("--sizes", default="small,large", help=f"model sizes, smallest first ({', '.join(SIZES)})")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
    p.add_argument("--out", default="bench/results_model_size.json", help="JSON results file")
    return p.parse_args()


def write_pairs(path: Path, n: int = 32) -> None:
    """n short rows over the word-level vocabulary: a 24-word prompt, 8-word completions."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = lambda k: " ".join(f"w{i}" for i in rng.integers(0, 500, k))  # noqa: E731
    with path.open("w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"prompt": words(24), "chosen": " " + words(8), "rejected": " " + words(8)}) + "\n")


def config(run: Path, model_dir: Path, data: Path) -> Path:
    cfg = {
        "model": str(model_dir),
        "dataset": [str(data)],
        "cache_dir": str(run / "cache"),
        "output_dir": str(run / "out"),
        "num_workers": 2,
        "cpus_per_worker": 1,
        "zero_stage": 3,
        "use_peft": True,
        "lora_r": 8,
        "lora_alpha": 16,
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "save_steps": 2,
        "gradient_checkpointing": True,
        "zero3_max_live_parameters": LIVE_PARAMETERS,
        "seed": 0,
    }
    path = run / "config.yaml"
    path.write_text(json.dumps(cfg, indent=2) + "\n")  # JSON is YAML
    return path


def run_size(work: Path, name: str, data: Path) -> dict[str, Any]:
    from pipeline.models.safetensors_files import checkpoint_files, mapped_state_dict

    model_dir = build_model(work, seed=0, name=f"model-{name}", **SIZES[name])
    weights = mapped_state_dict(checkpoint_files(model_dir) or [])  # views: shapes and dtypes, nothing read
    numel = sum(t.numel() for t in weights.values())
    model_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    run = work / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    cfg = config(run, model_dir, data)
    stages = {stage: run_stage(stage, cfg, run, MALLOC_ENV) for stage in ("tokenize", "score-ref", "train")}
    train = stages["train"]
    workers = [w["private_peak"] for w in train["workers_private_peaks"] if TRAIN_TITLE in w["title"]]
    if len(workers) != 2:
        raise SystemExit(f"expected 2 train workers, sampled {train['workers_private_peaks']}")
    summary = json.loads((run / "out" / "train_summary.json").read_text())
    merged = run / "out" / "final" / "merged"
    print(
        f"[bench] {name}: {numel / 1e6:.1f}M parameters ({model_bytes / MB:.0f} MB), train {train['wall_s']:.0f}s, "
        f"workers' private peaks {', '.join(f'{b / MB:.0f}' for b in workers)} MB, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    return {
        "size": name,
        "shape": SIZES[name],
        "parameters": numel,
        "model_bytes": model_bytes,
        "train_wall_s": train["wall_s"],
        "worker_private_peaks": workers,
        "worker_private_peaks_in_loop": summary["worker_private_memory_bytes"],
        "merged_files": sorted(p.name for p in merged.iterdir() if p.suffix in (".safetensors", ".json")),
        "stages": stages,
    }


def acceptance(runs: list[dict[str, Any]]) -> dict[str, Any]:
    a, b = runs[0], runs[-1]
    slope = (max(b["worker_private_peaks"]) - max(a["worker_private_peaks"])) / (b["model_bytes"] - a["model_bytes"])
    return {"from": a["size"], "to": b["size"], "slope": slope, "limit": SLOPE_LIMIT, "passed": slope <= SLOPE_LIMIT}


def main() -> None:
    args = parse_args()
    names = args.sizes.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-model-size-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before, started = os.getloadavg(), time.perf_counter()
    print(f"[bench] sizes {names}, work {work}, load average {load_before}", flush=True)
    data = work / "pairs.jsonl"
    write_pairs(data)
    runs = [run_size(work, name, data) for name in names]
    accept = acceptance(runs)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(load_before),
        "wall_s": time.perf_counter() - started,
        "runs": runs,
        "acceptance": accept,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"acceptance: the larger worker peak grows {accept['slope']:.3f} bytes per byte of model, "
        f"{runs[0]['size']} -> {runs[-1]['size']} (limit {SLOPE_LIMIT}): {'PASS' if accept['passed'] else 'FAIL'}"
    )
    print(f"[bench] {report['wall_s']:.0f}s in all; results written to {out}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
