"""Stage 3: train the policy alone against cached reference scores, with Ray Train + DeepSpeed ZeRO.

    dpo-pipeline train --config configs/demo.yaml

No reference model exists here: its scores come from stage 2's cache, merged with the tokenized pairs by
pair_id into a training table (pipeline.data.table) that every worker memory-maps. Reference-free losses alone
(cpo, simpo, orpo) need no scores: the table then holds the tokenized pairs only. Each micro-batch of B pairs is
ONE forward of 2B sequences (chosen then rejected), then the combined loss. Metrics are all-reduced once per
optimizer step. A checkpoint holds every rank's DeepSpeed shards plus the loop's state; the data schedule is
a pure function of (seed, step), so resuming continues the data order exactly.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import rundir
from pipeline.cache.storage import LocalMirror, location, write_json_atomic
from pipeline.cluster import cpus_each
from pipeline.config import Config
from pipeline.data.entries import TableEntry, find_reference, find_tokenized
from pipeline.data.table import build_table, training_schedule
from pipeline.models.kernels import choose_kernels
from pipeline.models.loading import resolve_model
from pipeline.models.sequence_parallel import check_model
from pipeline.redact import redact_value
from pipeline.report.loggers import resolve_loggers
from pipeline.train.faults import Fault
from pipeline.train.resume import check_resume, run_settings
from pipeline.train.train_state import STATE_FILE, TrainState, WorkerArgs

DS_TAG = "ds"


# --- driver: find the cached inputs, merge them into training tables, launch the workers ---


def run_train(cfg: Config, restart: bool = False, verify: bool = False) -> dict[str, Any]:
    cfg = cfg.with_absolute_paths()
    loggers = resolve_loggers(cfg)  # a requested logger that is not installed fails here, before any work
    t, s = cfg.train, cfg.scale
    if not s.use_gpu:  # a GPU cluster's driver may have none: there the workers check
        choose_kernels(cfg.model, cuda=False, dtype=cfg.compute_dtype)
    # the run directory records its inputs (data reports, cache entries) so that `dpo-pipeline report` finds them
    tables: dict[str, TableEntry] = {}
    inputs: dict[str, dict[str, Any]] = {}
    for split, specs in (("train", cfg.data.dataset), ("eval", cfg.data.eval_dataset)):
        if not specs:
            continue
        tok = find_tokenized(cfg, specs, verify)
        reference = find_reference(cfg, tok, verify) if cfg.loss.needs_reference else None
        tables[split] = build_table(cfg, tok, reference, split, verify)
        inputs[split] = {
            "pairs": tok.manifest["rows"],
            "tokenized": str(tok.path),
            "reference": None if reference is None else str(reference.path),
            "table": str(tables[split].path),
        }
        rundir.write_data_report(cfg.data.output_dir, tok, split)
    n_pairs = tables["train"].manifest["rows"]
    schedule = training_schedule(cfg, tables["train"])

    total = schedule.total_steps(t.num_train_epochs, t.max_steps)
    model_dir = resolve_model(cfg.model.model, cfg.data.cache_dir)
    check_model(model_dir, s.sequence_parallel_size, cfg.model.trust_remote_code)
    cpus = cpus_each(s.cpus_per_worker, s.num_workers)
    storage = s.storage_path or str(location(cfg.data.output_dir) / "ray")
    check_resume(run_settings(cfg, tables["train"].key), location(storage) / s.run_name, restart)
    batch = (
        f"micro-batches of <= {t.max_tokens_per_batch} tokens"
        if t.max_tokens_per_batch
        else f"global batch {t.per_device_train_batch_size * schedule.per_step}"
    )
    groups = f" in {s.data_parallel_size} group(s) sharing each sequence" if s.sequence_parallel_size > 1 else ""
    print(
        f"[train] {n_pairs} pairs, {batch}, {total} steps on {s.num_workers} worker(s) x {cpus} CPU{groups}, "
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
            "args": WorkerArgs(
                cfg=cfg,
                model_dir=model_dir,
                total_steps=total,
                cpus=cpus,
                loggers=loggers,
                tables=tables,
                inputs=inputs,
                after_step=Fault.from_env(),
            )
        },
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=s.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    _fit(trainer)
    summary = rundir.read_json(cfg.data.output_dir, rundir.SUMMARY)
    assert summary is not None, "the workers finished without writing the summary"
    return summary


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


def train_loop(config: dict[str, WorkerArgs]) -> None:
    from pipeline.models.deepspeed_import import import_deepspeed

    import_deepspeed()  # before the engine, to register the CPU accelerator; without MLflow
    from pipeline.core.metrics import finalize, slot_total
    from pipeline.data.table import open_table
    from pipeline.models.loading import load_tokenizer
    from pipeline.report.loggers import MetricsLog, open_loggers
    from pipeline.train.checkpoint_files import rank_checkpoint
    from pipeline.train.collectives import all_reduce, all_reduce_rows
    from pipeline.train.engine import build_training, gradient_norm, peak_memory_bytes, private_memory_bytes
    from pipeline.train.export import export_model
    from pipeline.train.step import Evaluator, micro_step

    args = config["args"]
    cfg, total = args.cfg, args.total_steps
    torch.set_num_threads(args.cpus)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    k = cfg.scale.sequence_parallel_size
    dp_rank, dp_world = rank // k, world // k  # a sequence-parallel group reads its pairs as one rank
    t = cfg.train
    fetch = (rundir.METRICS, rundir.TENSORBOARD) if rank == 0 else ()
    output = LocalMirror(cfg.data.output_dir, fetch=fetch)
    out_dir = output.local  # output_dir itself, or a local copy of a URI that rank 0 uploads (push)

    # --- setup: data, policy, engine, resume ---
    train_pairs = open_table(args.tables["train"])  # memory-mapped: one copy per node, in the page cache
    tokenizer = load_tokenizer(args.model_dir, cfg.model.trust_remote_code)
    engine, kernels, group = build_training(cfg, args.model_dir, world, total)  # ZeRO-3: built partitioned
    if rank == 0:
        split = f"; each sequence split over {k} workers (Ulysses)" if group is not None else ""
        print(f"[train] kernels: {kernels.describe()}{split}", flush=True)
    schedule = train_pairs.schedule(cfg, dp_world)
    evaluate = None
    if cfg.data.eval_dataset:
        eval_pairs = open_table(args.tables["eval"])
        evaluate = Evaluator(cfg, eval_pairs, dp_rank, dp_world, tokenizer.pad_token_id, group)

    state = TrainState(config=run_settings(cfg, args.tables["train"].key))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with rank_checkpoint(checkpoint, rank) as d:  # this rank's files only, not every rank's
            engine.load_checkpoint(d, tag=DS_TAG)
            saved = TrainState.from_json(rundir.read_json(Path(d), STATE_FILE) or {})
            state = dataclasses.replace(saved, config=state.config)  # the driver checked what may change
        print(f"[train] rank {rank}: resumed from step {state.step}", flush=True)
    log = MetricsLog(str(out_dir), state.step, total, open_loggers(args.loggers, cfg)) if rank == 0 else None

    def log_eval(at_step: int) -> dict[str, float] | None:
        if evaluate is None:
            return None
        values = evaluate(engine)
        if log is not None:
            log.write(at_step, values, prefix=rundir.EVAL_PREFIX)
        return values

    if state.step == 0:
        log_eval(0)

    # --- the loop: one optimizer step = gradient_accumulation_steps micro-batches per rank ---
    started = time.time()
    steps_at_start = state.step
    private_peak = private_memory_bytes()
    while state.step < total:
        rows, own_norm = [], None
        for idx in schedule.micro_batches(state.step, dp_rank):
            r = micro_step(
                cfg,
                engine,
                train_pairs,
                idx,
                tokenizer.pad_token_id,
                loss_scale=schedule.loss_scale(state.step, len(idx)),
                group=group,
            )
            engine.backward(r.loss)
            if cfg.scale.zero_stage == 0 and engine.is_gradient_accumulation_boundary():
                own_norm = gradient_norm(engine.module)  # DeepSpeed clips at ZeRO-0 but keeps no norm
            engine.step()
            rows.append(r.metric_row)
        private_peak = max(private_peak, private_memory_bytes())
        state.step += 1
        step = state.step
        reduced = all_reduce_rows(rows, engine.device)  # one collective per optimizer step
        state.window.extend(reduced)
        state.num_tokens += int(slot_total(reduced, "input_tokens"))
        state.pairs_seen += int(slot_total(reduced, "pairs"))
        if step % t.logging_steps == 0 or step == total:
            values = finalize(torch.stack(state.window))
            grad_norm = engine.get_global_grad_norm() if own_norm is None else own_norm
            elapsed = state.train_seconds + time.time() - started
            values |= {
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "learning_rate": engine.get_lr()[0],
                "epoch": schedule.epoch_progress(step),
                "num_tokens": state.num_tokens,
                "pairs_per_second": state.pairs_seen / max(elapsed, 1e-9),
            }
            state.window = []
            if log is not None:
                log.write(step, values)
        if step % (t.eval_steps or t.logging_steps) == 0 and step != total:
            log_eval(step)
        if step % t.save_steps == 0 or step == total:  # the last one lets a rerun of a finished run stop at once
            state.train_seconds += time.time() - started
            started = time.time()
            _save(engine, state, rank)
            if rank == 0:
                output.push()
        if args.after_step is not None:
            args.after_step(step, rank)

    # --- end: final eval, export, summary ---
    final_eval = log_eval(state.step)
    private = torch.zeros(world, dtype=torch.float64)  # each rank's peak, gathered by a sum of one-hot rows
    private[rank] = max(private_peak, private_memory_bytes())
    private = all_reduce(private, engine.device)
    export_model(engine.module, tokenizer, out_dir / rundir.FINAL, rank, cfg.model.use_peft)
    if rank == 0 and log is not None:
        log.close()
        seconds = state.train_seconds
        summary = {
            "train_runtime": round(seconds, 3),
            "train_steps": state.step,
            "steps_this_run": state.step - steps_at_start,
            "train_samples_per_second": state.pairs_seen / seconds if seconds else 0.0,
            "train_tokens_per_second": state.num_tokens / seconds if seconds else 0.0,
            "peak_memory_bytes": peak_memory_bytes(),
            "worker_private_memory_bytes": [int(b) for b in private.tolist()],  # RssAnon peak per rank
            "num_workers": world,
            "sequence_parallel_size": k,
            "zero_stage": cfg.scale.zero_stage,
            "final_eval": final_eval,
            "inputs": args.inputs,
            "loggers": args.loggers.describe(),
            "config": redact_value(cfg.flat()),
        }
        write_json_atomic(out_dir / rundir.SUMMARY, summary)
        output.push()
    output.close()
    ray.train.report({"step": state.step})


def _save(engine: Any, state: TrainState, rank: int) -> None:
    """Every rank writes its own DeepSpeed files (its partitions; rank 0 the model states and state.json) into a
    folder of its own, which Ray Train uploads into the one checkpoint in storage: no rank stages another's."""
    tmp = Path(tempfile.mkdtemp(prefix=f"ckpt-{state.step}-"))
    try:
        engine.save_checkpoint(str(tmp), tag=DS_TAG)
        if rank == 0:
            write_json_atomic(tmp / STATE_FILE, state.to_json())
        ray.train.report({"step": state.step}, checkpoint=Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
