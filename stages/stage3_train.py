"""Stage 3: train the policy alone against cached reference scores, with Ray Train + DeepSpeed ZeRO.

    dpo-pipeline train --config configs/demo.yaml

No reference model exists here: its scores come from stage 2's cache, joined to the tokenized pairs by
pair_id with Ray Data. Each micro-batch of B pairs is ONE forward of 2B sequences (chosen then rejected),
then the combined loss. Metrics are all-reduced once per optimizer step. A checkpoint holds every rank's
DeepSpeed shards plus the step; the data schedule is a pure function of (seed, step), so resuming
continues the data order exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import schema
from pipeline.cache import write_json_atomic
from pipeline.config import Config
from pipeline.core import batching
from pipeline.errors import CacheError, ConfigError
from pipeline.kernels import choose_kernels
from pipeline.loggers import LoggerSpec, open_loggers, resolve_loggers
from pipeline.models import resolve_model
from pipeline.redact import redact_value
from pipeline.storage import LocalMirror, location
from pipeline.training import PairTable
from stages.stage1_tokenize import find_tokenized, write_data_report
from stages.stage2_score_ref import ReferenceScores, find_reference

STATE = "state.json"
DS_TAG = "ds"
# Fault injection for the fault-tolerance tests: "kill:<step>:<marker>" SIGKILLs the rank-0 worker, "raise:..."
# raises, once, right after optimizer step <step> (the marker file records that it happened).
FAULT_ENV = "DPO_PIPELINE_FAULT"


# --- driver: find the cached inputs, join them, launch the workers ---


def joined_dataset(tokenized_files: list[str], reference: ReferenceScores, expected: int) -> Any:
    """Tokenized pairs joined with their reference scores by pair_id (never by row order)."""
    tok = ray.data.read_parquet(tokenized_files)
    ref = ray.data.read_parquet(reference.files)
    joined = tok.join(
        ref, join_type="inner", num_partitions=max(1, min(16, expected // 4096 + 1)), on=(schema.PAIR_ID,)
    ).materialize()
    if joined.count() != expected:
        raise CacheError(
            f"reference scores in {reference.path} cover {joined.count()} of {expected} tokenized "
            "pairs; rerun `dpo-pipeline score-ref --force`."
        )
    return joined


def training_schedule(cfg: Config, tokenized_files: list[str]) -> batching.Schedule:
    """The run's schedule, from the tokenized pairs (their lengths only when a token budget needs them)."""
    columns = [schema.PAIR_ID]
    if cfg.train.max_tokens_per_batch:
        columns += [schema.CHOSEN_INPUT_IDS, schema.REJECTED_INPUT_IDS]
    pairs = PairTable.from_batches([pq.read_table(f, columns=columns) for f in tokenized_files])
    return pairs.schedule(cfg, cfg.scale.num_workers)


def run_train(cfg: Config) -> dict[str, Any]:
    cfg = cfg.with_absolute_paths()
    loggers = resolve_loggers(cfg)  # a requested logger that is not installed fails here, before any work
    tokenized = find_tokenized(cfg, cfg.data.dataset)
    n_pairs = tokenized.manifest["rows"]
    t, s = cfg.train, cfg.scale
    if not s.use_gpu:  # a GPU cluster's driver may have none: there the workers check
        choose_kernels(cfg.model, cuda=False, dtype=cfg.compute_dtype)
    schedule = training_schedule(cfg, tokenized.files)
    if schedule.steps_in_epoch(0) < 1:
        need = (
            f"num_workers x gradient_accumulation_steps = {schedule.per_step} micro-batches of <= "
            f"{t.max_tokens_per_batch} tokens"
            if t.max_tokens_per_batch
            else f"num_workers x per_device_train_batch_size x gradient_accumulation_steps = "
            f"{schedule.per_step * t.per_device_train_batch_size} pairs"
        )
        raise ConfigError(
            f"one optimizer step needs {need}, but the training data has {n_pairs} pairs; lower them or add data."
        )
    # the run directory records its inputs (data reports, cache entries) so that `dpo-pipeline report` finds them
    datasets: dict[str, Any] = {}
    inputs: dict[str, dict[str, Any]] = {}
    for split, specs in (("train", cfg.data.dataset), ("eval", cfg.data.eval_dataset)):
        if not specs:
            continue
        tok = tokenized if split == "train" else find_tokenized(cfg, specs)
        reference = find_reference(cfg, tok)
        datasets[split] = joined_dataset(tok.files, reference, tok.manifest["rows"])
        inputs[split] = {"pairs": tok.manifest["rows"], "tokenized": str(tok.path), "reference": str(reference.path)}
        write_data_report(cfg.data.output_dir, tok, split)

    total = schedule.total_steps(t.num_train_epochs, t.max_steps)
    cpus = s.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // s.num_workers)
    storage = s.storage_path or str(location(cfg.data.output_dir) / "ray")
    batch = (
        f"micro-batches of <= {t.max_tokens_per_batch} tokens"
        if t.max_tokens_per_batch
        else f"global batch {t.per_device_train_batch_size * schedule.per_step}"
    )
    print(
        f"[train] {n_pairs} pairs, {batch}, {total} steps on {s.num_workers} worker(s) x {cpus} CPU, "
        f"ZeRO-{s.zero_stage}; checkpoints in {storage}/{s.run_name}",
        flush=True,
    )
    if schedule.left_out(0):
        print(
            f"[train] {schedule.left_out(0)} pairs per epoch fall after the last full optimizer step and wait "
            "for the next epoch's shuffle",
            flush=True,
        )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg,
            "model_dir": resolve_model(cfg.model.model, cfg.data.cache_dir),
            "total_steps": total,
            "cpus": cpus,
            "loggers": loggers,
            "inputs": inputs,
        },
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=s.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),  # every rank holds all pairs; the schedule splits
    )
    _fit(trainer)
    return json.loads((location(cfg.data.output_dir) / "train_summary.json").read_text())


def _fit(trainer: TorchTrainer) -> None:
    """trainer.fit(), with Ctrl-C reported as KeyboardInterrupt. In the main thread Ray Train installs a SIGINT
    handler that aborts the workers gracefully and then exits the process (SystemExit); the CLI turns a
    KeyboardInterrupt into "interrupted" and status 130. Afterwards the previous handler is back."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main else None
    try:
        trainer.fit()
    except SystemExit:
        raise KeyboardInterrupt from None
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


# --- worker ---


def train_loop(config: dict[str, Any]) -> None:
    import deepspeed  # noqa: F401  (imported before the engine to register the CPU accelerator)

    from pipeline.core.metrics import finalize, slot_total
    from pipeline.models import load_tokenizer
    from pipeline.training import (
        MetricsLog,
        all_reduce_rows,
        build_engine,
        build_policy,
        eval_metrics,
        export_model,
        gradient_norm,
        load_pairs,
        micro_step,
        peak_memory_bytes,
    )

    cfg: Config = config["cfg"]
    total, cpus = config["total_steps"], config["cpus"]
    ray.data.DataContext.get_current().enable_progress_bars = False  # the [train] lines are the progress
    torch.set_num_threads(cpus)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t = cfg.train
    output = LocalMirror(cfg.data.output_dir, fetch=("metrics.jsonl", "tensorboard") if rank == 0 else ())
    out_dir = output.local  # output_dir itself, or a local copy of a URI that rank 0 uploads (push)

    # --- setup: data, policy, engine, resume ---
    train_pairs = load_pairs(ray.train.get_dataset_shard("train"))
    eval_shard = ray.train.get_dataset_shard("eval") if cfg.data.eval_dataset else None
    eval_pairs = load_pairs(eval_shard) if eval_shard is not None else None
    tokenizer = load_tokenizer(config["model_dir"], cfg.model.trust_remote_code)
    kernels = choose_kernels(cfg.model, cuda=cfg.scale.use_gpu and torch.cuda.is_available(), dtype=cfg.compute_dtype)
    if rank == 0:
        print(f"[train] kernels: {kernels.describe()}", flush=True)
    engine = build_engine(cfg, build_policy(cfg, config["model_dir"], kernels), world, total)
    schedule = train_pairs.schedule(cfg, world)

    step, window, state = 0, [], {"num_tokens": 0, "train_seconds": 0.0, "pairs_seen": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG)
            state = json.loads((Path(d) / STATE).read_text())
        step, window = state["step"], [torch.tensor(r, dtype=torch.float64) for r in state["window"]]
        print(f"[train] rank {rank}: resumed from step {step}", flush=True)
    loggers: LoggerSpec = config["loggers"]
    log = MetricsLog(str(out_dir), step, total, open_loggers(loggers, cfg)) if rank == 0 else None

    # The eval batches of every rank, cut once; weighting each batch's mean loss by its pairs makes the eval
    # loss the exact mean over eval pairs.
    eval_plan = [eval_pairs.eval_batches(cfg, r, world) for r in range(world)] if eval_pairs is not None else []
    real_batches = sum(len(b) > 0 for batches in eval_plan for b in batches)

    def evaluate(at_step: int) -> dict[str, float] | None:
        if eval_pairs is None:
            return None
        engine.eval()
        rows = []
        with torch.no_grad():
            for idx in eval_plan[rank]:
                filler = len(idx) == 0  # a rank out of pairs still joins the collectives, with weight 0
                rows.append(
                    micro_step(
                        cfg,
                        engine,
                        eval_pairs,
                        np.zeros(1, dtype=np.int64) if filler else idx,
                        tokenizer.pad_token_id,
                        world,
                        weight=0.0 if filler else 1.0,
                        loss_scale=len(idx) * real_batches / len(eval_pairs),
                    ).metric_row
                )
        engine.train()
        values = eval_metrics([all_reduce_rows(rows, world).sum(dim=0)])
        if log is not None:
            log.write(at_step, values, prefix="eval_")
        return values

    if step == 0 and eval_pairs is not None:
        evaluate(0)

    # --- the loop: one optimizer step = gradient_accumulation_steps micro-batches per rank ---
    started = time.time()
    steps_at_start = step
    while step < total:
        rows, own_norm = [], None
        for idx in schedule.micro_batches(step, rank):
            r = micro_step(
                cfg,
                engine,
                train_pairs,
                idx,
                tokenizer.pad_token_id,
                world,
                loss_scale=schedule.loss_scale(step, len(idx)),
            )
            engine.backward(r.loss)
            if cfg.scale.zero_stage == 0 and engine.is_gradient_accumulation_boundary():
                own_norm = gradient_norm(engine.module)  # DeepSpeed clips at ZeRO-0 but keeps no norm
            engine.step()
            rows.append(r.metric_row)
        step += 1
        reduced = all_reduce_rows(rows, world)  # one collective per optimizer step
        window.extend(reduced)
        state["num_tokens"] += int(slot_total(reduced, "input_tokens"))
        state["pairs_seen"] += int(slot_total(reduced, "pairs"))
        if step % t.logging_steps == 0 or step == total:
            values = finalize(torch.stack(window))
            grad_norm = engine.get_global_grad_norm() if own_norm is None else own_norm
            elapsed = state["train_seconds"] + time.time() - started
            values |= {
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "learning_rate": engine.get_lr()[0],
                "epoch": schedule.epoch_progress(step),
                "num_tokens": state["num_tokens"],
                "pairs_per_second": state["pairs_seen"] / max(elapsed, 1e-9),
            }
            window = []
            if log is not None:
                log.write(step, values)
        if eval_pairs is not None and step % (t.eval_steps or t.logging_steps) == 0 and step != total:
            evaluate(step)
        if step % t.save_steps == 0 or step == total:  # the last one lets a rerun of a finished run stop at once
            state["train_seconds"] += time.time() - started
            started = time.time()
            _save(engine, {**state, "step": step, "window": [w.tolist() for w in window]}, rank, step)
            if rank == 0:
                output.push()
        _inject_fault(step, rank)

    # --- end: final eval, export, summary ---
    final_eval = evaluate(step)
    export_model(cfg, engine, tokenizer, out_dir / "final", rank)
    if rank == 0 and log is not None:
        log.close()
        seconds = state["train_seconds"]
        summary = {
            "train_runtime": round(seconds, 3),
            "train_steps": step,
            "steps_this_run": step - steps_at_start,
            "train_samples_per_second": state["pairs_seen"] / seconds if seconds else 0.0,
            "train_tokens_per_second": state["num_tokens"] / seconds if seconds else 0.0,
            "peak_memory_bytes": peak_memory_bytes(),
            "num_workers": world,
            "zero_stage": cfg.scale.zero_stage,
            "final_eval": final_eval,
            "inputs": config["inputs"],
            "loggers": loggers.describe(),
            "config": redact_value(cfg.flat()),
        }
        write_json_atomic(out_dir / "train_summary.json", summary)
        output.push()
    output.close()
    ray.train.report({"step": step})


def _inject_fault(step: int, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec or rank != 0:
        return
    kind, at, marker = spec.split(":", 2)
    if step == int(at) and not Path(marker).exists():
        Path(marker).touch()
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"{FAULT_ENV}: injected failure after step {step}")


def _save(engine: Any, state: dict[str, Any], rank: int, step: int) -> None:
    """Every rank writes its DeepSpeed shards into its own folder; Ray Train gathers them in storage."""
    tmp = Path(tempfile.mkdtemp(prefix=f"ckpt-{step}-"))
    try:
        engine.save_checkpoint(str(tmp), tag=DS_TAG)
        if rank == 0:
            write_json_atomic(tmp / STATE, state)
        ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
