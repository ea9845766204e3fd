"""The colour pairs the stage-3 tests train on (32 training pairs, 6 eval pairs), tokenized and scored by the tiny
model once per test session: the `colour_pairs` fixture in conftest.py builds them under a file lock (under
pytest-xdist, the first worker to need them) and each test module that trains on them copies the cache, whose
entries its runs then reuse (keys are content digests, so another worker's identical tiny model finds them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import Config

COLOURS = ["red", "blue", "green", "gold", "black", "white", "pink", "grey"]
TRAIN_ROWS = [
    {
        "prompt": f"Name colour number {i}:",
        "chosen": f" {COLOURS[i % 8]} {i}",
        "rejected": f" {COLOURS[(i + 3) % 8]} {COLOURS[i % 5]} {i + 1}",
    }
    for i in range(32)
]
EVAL_PAIRS = [(f"Which colour is {i}?", f" {COLOURS[i % 8]}", f" not {COLOURS[i % 8]}") for i in range(6)]


@dataclass(frozen=True)
class ColourPairs:
    root: Path

    @property
    def train(self) -> Path:
        return self.root / "train.jsonl"

    @property
    def eval(self) -> Path:
        return self.root / "eval.jsonl"

    @property
    def cache(self) -> Path:
        """A cache_dir with both splits tokenized and scored by the tiny model (the default dtype, float32)."""
        return self.root / "cache"


def tokenize_and_score(cfg: Config) -> None:
    """Stages 1 and 2 on both splits of `cfg` (an entry already in its cache is reused)."""
    from stages.stage1_tokenize import run_tokenize
    from stages.stage2_score_ref import run_score_ref

    for split, specs in (("train", cfg.data.dataset), ("eval", cfg.data.eval_dataset)):
        run_score_ref(cfg, run_tokenize(cfg, specs, split), split)


def build_colour_pairs(root: Path, model_dir: Path) -> None:
    """Write the data into `root` and run stages 1 and 2 on both splits into `ColourPairs(root).cache`."""
    from pipeline.config import config_from_dict

    pairs = ColourPairs(root)
    root.mkdir(parents=True, exist_ok=True)
    evals = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in EVAL_PAIRS]
    for path, rows in ((pairs.train, TRAIN_ROWS), (pairs.eval, evals)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config_from_dict(
        {
            "model": str(model_dir),
            "cache_dir": str(pairs.cache),
            "output_dir": str(pairs.root / "prep"),
            "dataset": [str(pairs.train)],
            "eval_dataset": [str(pairs.eval)],
        }
    )
    tokenize_and_score(cfg)
