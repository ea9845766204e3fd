"""The optional judge: a user's Python function that compares the reference's and the policy's answers.

    # my_judge.py, importable from the working directory or the environment
    def judge(prompt: str, reference: str, policy: str) -> float:
        return 1.0 if len(policy) < len(reference) else 0.0     # 1 = policy better, 0 = reference, 0.5 = tie

    dpo-pipeline run --config ... --judge my_judge:judge

It is called once per eval prompt with the two greedy completions; the mean of its scores is the policy's win
rate in the report. No network is contacted unless the function does so itself.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from pipeline.errors import ConfigError, PipelineError

Judge = Callable[[str, str, str], float]


def load_judge(spec: str) -> Judge:
    """The function named by `module:function` (the `judge` key), or ConfigError saying what is wrong."""
    module_name, _, name = spec.partition(":")
    if os.getcwd() not in sys.path:  # a console script does not put the working directory on the path
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(f"judge={spec!r}: cannot import {module_name}: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"judge={spec!r}: {module_name} has no function {name!r}")
    judge: Judge = fn
    return judge


def judge_score(judge: Judge, spec: str, index: int, prompt: str, reference: str, policy: str) -> float:
    """One judged prompt; an error or a value outside [0, 1] names the judge and the prompt."""
    where = f"judge {spec} on eval prompt {index} ({prompt[:60]!r})"
    try:
        value: Any = judge(prompt, reference, policy)
    except Exception as e:
        raise PipelineError(f"{where} failed: {type(e).__name__}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise PipelineError(f"{where} returned {value!r}: expected a number in [0, 1] (1 = the policy's is better)")
    return float(value)
