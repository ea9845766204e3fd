"""The command line's arguments: the subcommands, one flag per config key, and the flags that are not keys.

args = build_parser().parse_args(argv)
cfg = parse_config(args)                 # the YAML file, overridden by the flags, validated
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pipeline.config import (
    SECTIONS,
    TRL_ALIASES,
    TRL_KEYS,
    Config,
    config_fields,
    describe_type,
    field_type,
    load_config,
)

COMMANDS = {
    "tokenize": "Stage 1: tokenize the preference data (dataset and eval_dataset) into the cache.",
    "score-ref": "Stage 2: score the tokenized pairs with the frozen reference model into the cache.",
    "train": "Stage 3: train the policy against the cached reference scores.",
    "generate": "Stage 4: answer the eval prompts with the reference (cached) and the trained policy; writes "
    "generations.jsonl and the answer accuracy before and after.",
    "run": "Stages 1-3 in order, each skipped when its cached output is valid, then stage 4 when eval_dataset "
    "is set and max_new_tokens > 0.",
    "report": "Write report.md and PNG plots (loss, rewards, accuracy, log-probs, learning rate and grad norm, "
    "reference margins) for a run directory; `train` and `run` do this at their end.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpo-pipeline",
        description="Scalable DPO on Ray: tokenize, score the reference once, train the policy alone.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        if name == "report":
            p.add_argument(
                "run_dir",
                metavar="RUN_DIR",
                help="The output_dir of a training run (it holds metrics.jsonl). Writes "
                "RUN_DIR/report.md and RUN_DIR/plots/*.png.",
            )
            continue
        p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys (flags override it).")
        if name in ("tokenize", "score-ref", "run"):
            p.add_argument("--force", action="store_true", help="Rebuild cached outputs even when valid.")
        if name in ("train", "run"):
            p.add_argument(
                "--restart",
                action="store_true",
                help="Delete the checkpoints of an earlier run with this storage_path/run_name and train from "
                "step 0. Without it a rerun resumes, and refuses when settings that change the run differ.",
            )
        p.add_argument(
            "--verify",
            action="store_true",
            help="Recompute the checksum of every file of a reused cache entry (reads it whole); without it a "
            "lookup checks that each file is there with its recorded size.",
        )
        p.add_argument(
            "--verbose",
            action="store_true",
            help="Print Ray's, DeepSpeed's and the libraries' logs on the console too. Without it the console "
            "shows the pipeline's own lines, and those logs go to OUTPUT_DIR/logs/pipeline.log.",
        )
        _add_config_flags(p)
        _add_trl_flags(p)
    return parser


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    fields = config_fields()
    for section in SECTIONS:
        group = p.add_argument_group(f"{section} settings")
        for key, (sec, f) in fields.items():
            if sec != section:
                continue
            default = f.default if not isinstance(f.default, tuple) else ",".join(map(str, f.default))
            group.add_argument(
                f"--{key}",
                dest=f"cfg_{key}",
                metavar="V",
                default=argparse.SUPPRESS,
                help=f"{f.metadata['help']} [{describe_type(field_type(sec, key))}; default: {default}]",
            )


def _add_trl_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("TRL's names (each read as the key it names)")
    helps = {
        **{alias: f"TRL's name for --{key}." for alias, key in TRL_ALIASES.items()},
        "dataset_name": "A hub dataset id (in the local Hugging Face cache) or a directory: sets --dataset to "
        "NAME:SPLIT with --dataset_train_split (default train), and --eval_dataset with --dataset_test_split.",
        "dataset_train_split": "The split of --dataset_name to train on (default train).",
        "dataset_test_split": "The split of --dataset_name to evaluate on (default: no eval set).",
    }
    for key in TRL_KEYS:
        group.add_argument(f"--{key}", dest=f"cfg_{key}", metavar="V", default=argparse.SUPPRESS, help=helps[key])


def parse_config(args: argparse.Namespace) -> Config:
    overrides = {k[len("cfg_") :]: v for k, v in vars(args).items() if k.startswith("cfg_")}
    return load_config(args.config, overrides).with_absolute_paths()


@dataclass(frozen=True)
class Options:
    """The command-line flags that are not config keys."""

    force: bool = False
    verify: bool = False
    restart: bool = False
    verbose: bool = False
