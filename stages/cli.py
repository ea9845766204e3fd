"""The `dpo-pipeline` command: parse config -> run stages. Also `python -m pipeline` (and `python -m stages.cli`).

    dpo-pipeline run --config configs/demo.yaml
    dpo-pipeline train --config my.yaml --beta 0.2 --loss_type sigmoid,sft --loss_weights 0.8,0.2

Every subcommand takes `--config FILE.yaml` and one flag per config key, which overrides the file.
User errors (bad config, bad data, missing cache, an output location that cannot be written) print one
clear message and exit with status 2. Ctrl-C exits with status 130 after Ray has stopped what this run
started; rerunning resumes. Everything printed passes through pipeline.redact (no tokens or keys). The console
shows the pipeline's own lines; Ray's, DeepSpeed's and the libraries' logs go to OUTPUT_DIR/logs/pipeline.log
(pipeline.console), or to the console too with `--verbose`.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from pipeline.cache.storage import check_writable, write_problem
from pipeline.cluster import init_ray
from pipeline.config import Config
from pipeline.console import open_console
from pipeline.data.entries import TokenizedData, find_tokenized
from pipeline.errors import PipelineError, find_pipeline_error
from pipeline.evaluate.judge import load_judge
from pipeline.redact import RedactingStream
from pipeline.report.loggers import resolve_loggers
from pipeline.report.run_report import write_report
from pipeline.rundir import FINAL, PLOTS, first_eval, write_data_report
from stages.cli_args import Options, build_parser, parse_config
from stages.stage1_tokenize import run_tokenize
from stages.stage2_score_ref import score_splits
from stages.stage3_train import run_train
from stages.stage4_generate import run_generate
from stages.stage4_generate import unsupported as unsupported_generation

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# --- commands ---


def splits(cfg: Config) -> list[tuple[str, tuple[str, ...]]]:
    """(split name, dataset specs) for the training data and, when set, the eval data."""
    return [(name, specs) for name, specs in (("train", cfg.data.dataset), ("eval", cfg.data.eval_dataset)) if specs]


def check_outputs(cfg: Config, command: str) -> None:
    """Fail before any work when a location this command writes cannot be written (the key names it)."""
    keys = {
        "tokenize": ("cache_dir", "output_dir"),
        "score-ref": ("cache_dir", "output_dir"),
        "train": ("output_dir", "storage_path"),
        "generate": ("cache_dir", "output_dir"),
        "run": ("cache_dir", "output_dir", "storage_path"),
    }[command]
    flat = cfg.flat()
    for key in keys:
        if flat[key] is not None:
            check_writable(flat[key], key)


def tokenize_splits(cfg: Config, opts: Options) -> dict[str, TokenizedData]:
    """Stage 1 for the training data and the eval data, each with its data report in output_dir."""
    out = {}
    for split, specs in splits(cfg):
        out[split] = run_tokenize(cfg, specs, split, force=opts.force, verify=opts.verify)
        write_data_report(cfg.data.output_dir, out[split], split)
    return out


def train(cfg: Config, command: str, opts: Options) -> dict[str, Any]:
    summary = run_train(cfg, restart=opts.restart, verify=opts.verify)
    print(
        f"[{command}] done: {summary['train_steps']} steps, {summary['train_samples_per_second']:.2f} pairs/s, "
        f"model in {cfg.data.output_dir}/{FINAL}",
        flush=True,
    )
    return summary


def cmd_tokenize(cfg: Config, opts: Options) -> None:
    init_ray("tokenize")
    tokenize_splits(cfg, opts)


def reference_free_note(cfg: Config) -> str:
    return (
        f"loss_type {','.join(cfg.loss.loss_type)} is reference-free: no reference model is loaded or scored, "
        "and training reads the tokenized pairs alone"
    )


def cmd_score_ref(cfg: Config, opts: Options) -> None:
    if not cfg.loss.needs_reference:
        print(f"[score-ref] nothing to score: {reference_free_note(cfg)}.", flush=True)
        return
    init_ray("score-ref")
    tokenized = {split: find_tokenized(cfg, specs, opts.verify) for split, specs in splits(cfg)}
    score_splits(cfg, tokenized, force=opts.force, verify=opts.verify)


def cmd_train(cfg: Config, opts: Options) -> None:
    init_ray("train")
    train(cfg, "train", opts)
    write_run_report(cfg.data.output_dir)


def cmd_run(cfg: Config, opts: Options) -> None:
    init_ray("run")
    tokenized = tokenize_splits(cfg, opts)
    if cfg.loss.needs_reference:
        score_splits(cfg, tokenized, force=opts.force, verify=opts.verify)
    else:
        print(f"[run] stage 2 skipped: {reference_free_note(cfg)}.", flush=True)
    final = train(cfg, "run", opts).get("final_eval")
    generated = None
    if cfg.data.eval_dataset and cfg.generate.max_new_tokens:
        if (why := unsupported_generation(cfg)) is None:
            generated = run_generate(cfg, opts.verify)
        else:
            print(f"[run] stage 4 skipped: {why}", flush=True)
    if final:
        first = first_eval(cfg.data.output_dir)
        print(
            f"held-out reward accuracy: {first['eval_rewards/accuracies']:.3f} -> {final['rewards/accuracies']:.3f}",
            flush=True,
        )
    if generated is not None:
        print_answer_accuracy(generated)
    write_run_report(cfg.data.output_dir)


def cmd_generate(cfg: Config, opts: Options) -> None:
    init_ray("generate")
    print_answer_accuracy(run_generate(cfg, opts.verify))
    write_run_report(cfg.data.output_dir)


def print_answer_accuracy(summary: dict[str, Any]) -> None:
    """The answer accuracy line of `run` and `generate`, or why there is none."""
    acc = summary["answer_accuracy"]
    if acc is None:
        print("held-out answer accuracy: none of the eval prompts has a builtin checker", flush=True)
        return
    of = "" if acc["prompts"] == summary["prompts"] else f" ({acc['prompts']} of {summary['prompts']} prompts)"
    print(f"held-out answer accuracy: {acc['reference']:.3f} -> {acc['policy']:.3f}{of}", flush=True)


def write_run_report(output_dir: str) -> None:
    """The report at the end of `train`/`run` (on the driver). The model and metrics are complete by then, so
    a failure here is printed with the command that retries it, and the run still counts as done."""
    try:
        print(f"[report] {write_report(output_dir).path}", flush=True)
    except Exception as e:
        print(
            f"[report] could not write the report ({type(e).__name__}: {e}); the model and metrics are "
            f"complete. Retry with `dpo-pipeline report {output_dir}`.",
            flush=True,
        )


def cmd_report(run_dir: str) -> None:
    report = write_report(run_dir)
    print(f"report: {report.path} ({len(report.plots)} plots in {report.path.parent / PLOTS})", flush=True)


def command_table() -> dict[str, Callable[[Config, Options], None]]:
    """The stage commands, called with the config and the other flags."""
    return {
        "tokenize": cmd_tokenize,
        "score-ref": cmd_score_ref,
        "train": cmd_train,
        "generate": cmd_generate,
        "run": cmd_run,
    }


def main(argv: list[str] | None = None) -> int:
    with _redacted_console():
        args = build_parser().parse_args(argv)
        log = None
        try:
            if args.command == "report":
                cmd_report(args.run_dir)
                return 0
            cfg = parse_config(args)
            if args.command in ("train", "run"):
                resolve_loggers(cfg)  # a requested logger that is not installed fails before anything is written
            if args.command in ("generate", "run") and cfg.generate.judge:
                load_judge(cfg.generate.judge)  # so does a judge that cannot be imported
            check_outputs(cfg, args.command)
            opts = Options(getattr(args, "force", False), args.verify, getattr(args, "restart", False), args.verbose)
            with open_console(cfg.data.output_dir, args.command, opts.verbose) as log:
                command_table()[args.command](cfg, opts)
        except KeyboardInterrupt:
            _stop_ray()
            print("interrupted; rerun the same command to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as e:  # Ray wraps errors raised in workers; show the user's problem, not a traceback
            user_error = _user_error(e)
            if user_error is None:
                traceback.print_exc()  # a bug: the traceback, through the redacting console
                if log is not None:
                    print(f"Ray's and the libraries' logs of this command: {log}", file=sys.stderr)
                return 1
            print(f"error: {user_error}", file=sys.stderr)
            return EXIT_USER_ERROR
        return 0


@contextlib.contextmanager
def _redacted_console() -> Iterator[None]:
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(out), RedactingStream(err)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = out, err


def _stop_ray() -> None:
    """Ctrl-C: end this driver's Ray work now (its actors and workers; the local Ray it started, if any)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _user_error(e: BaseException) -> PipelineError | str | None:
    """The PipelineError behind `e` (Ray wraps worker errors), a failed write's reason, or None for a bug."""
    ours = find_pipeline_error(e)
    if ours is not None:
        return ours
    problem = write_problem(e)  # e.g. a full disk under a training worker: the reason, then where it happened
    return f"{problem} ({_first_line(e)})" if problem else None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__


if __name__ == "__main__":
    raise SystemExit(main())
