"""Resume only a run with the same trajectory: the settings a checkpoint was made with, compared on rerun.

Rerunning `train` or `run` with the same `storage_path` and `run_name` resumes from the last checkpoint
(Ray Train). Each checkpoint records the effective config (`TrainState.config`). Before any worker starts,
the driver compares it with the new config: a change to anything that decides what the run computes (data,
model, loss, optimizer, schedule, batch shape, workers, seed, ...) is refused with the changed keys and the
two ways out; a change to a key in ALLOWED_CHANGES (how often to log, evaluate and save, loggers, eval data,
where the cache lives, resources of other stages, what stage 4 generates after training) is allowed and
printed. A key the checkpoint does not record (one added by a later version) counts as its default: a key is
added with the default that does what the code did before it. A key the checkpoint records that the config no
longer has (one removed since) counts as changed: nothing says whether what the code does now is what the recorded
value did, so it is refused with its name unless it is in ALLOWED_CHANGES.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.cache.storage import Location, rmtree
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.rundir import read_json
from pipeline.train.train_state import STATE_FILE

TABLE_KEY = "train_table"


class _Removed:
    """The new side of a key the checkpoint records and the config no longer has."""

    def __repr__(self) -> str:
        return "(no longer a setting)"


REMOVED = _Removed()

# Keys that do not change the training trajectory: what is logged or evaluated, and when; where things are.
ALLOWED_CHANGES = frozenset(
    {
        "logging_steps", "eval_steps", "save_steps", "report_to", "eval_dataset", "per_device_eval_batch_size",
        "max_failures", "cpus_per_worker", "ref_actors", "cpus_per_ref_actor", "gpus_per_ref_actor",
        "precompute_ref_batch_size", "precompute_ref_max_tokens", "cache_dir", "output_dir", "storage_path", "run_name",
        "max_new_tokens", "num_generations", "temperature", "top_p", "report_samples", "judge",
        "zero3_max_live_parameters",
    }
)  # fmt: skip


def run_settings(cfg: Config, train_table: str) -> dict[str, Any]:
    """What a checkpoint records and a resume compares: the flat config, and the training table's key (the
    content of the data, its tokenization and its reference scores, which an unchanged path can hide)."""
    settings: dict[str, Any] = json.loads(json.dumps(cfg.flat(), default=str))
    return {**settings, TABLE_KEY: train_table}


def check_resume(new: dict[str, Any], run_dir: Location, restart: bool) -> None:
    """Refuse to resume a run whose checkpoint was made with other trajectory settings (`run_settings`); with
    `restart`, drop the run's checkpoints so that it starts over."""
    if restart:
        if run_dir.exists():
            rmtree(run_dir)
            print(f"[train] --restart: removed the checkpoints in {run_dir}; starting over", flush=True)
        return
    old = last_checkpoint_config(run_dir)
    if old is None:
        return
    defaults = json.loads(json.dumps(Config().flat(), default=str))  # a key newer than the checkpoint had its default
    compared = {k: (old.get(k, defaults.get(k)), new.get(k, REMOVED)) for k in old.keys() | new.keys()}
    changed = {k: (o, n) for k, (o, n) in compared.items() if o != n}
    refused = {k: ov for k, ov in changed.items() if k not in ALLOWED_CHANGES}
    if refused:
        lines = "\n".join(f"  {k}: {o!r} -> {n!r}" for k, (o, n) in sorted(refused.items()))
        if TABLE_KEY in refused:
            lines += "\n  (the training data, its tokenization or its reference scores differ)"
        raise ConfigError(
            f"{run_dir} holds checkpoints of a run with other settings, so it cannot be resumed:\n{lines}\n"
            "Start a new run (another run_name or output_dir), or pass --restart to discard its checkpoints and "
            "start over."
        )
    if changed:
        said = ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in sorted(changed.items()))
        print(f"[train] resuming with changed settings that do not alter the run: {said}", flush=True)


def last_checkpoint_config(run_dir: Location) -> dict[str, Any] | None:
    """The config recorded in the newest checkpoint of a Ray Train run directory (checkpoint_<timestamp>
    folders), None when there is none or it records none (a checkpoint of an older version)."""
    if not run_dir.is_dir():
        return None
    checkpoints = sorted((p for p in run_dir.iterdir() if p.name.startswith("checkpoint_")), key=lambda p: p.name)
    for checkpoint in reversed(checkpoints):
        state = read_json(checkpoint, STATE_FILE)
        if state is not None:
            config = state.get("config")
            return dict(config) if config else None
    return None
