"""The builtin demo preference data: deterministic, disjoint splits, every chosen answer right and every
rejected one wrong, checked by recomputing each answer from the question text here."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter
from collections.abc import Callable

import pytest

from pipeline.data.demo_data import BUILTIN_DATASETS, FAMILIES, builtin_dataset_path, generate_pairs
from pipeline.errors import PipelineError

_UNIT_FACTORS = {
    ("kilometers", "meters"): 1000,
    ("meters", "centimeters"): 100,
    ("centimeters", "millimeters"): 10,
    ("kilograms", "grams"): 1000,
    ("liters", "milliliters"): 1000,
    ("hours", "minutes"): 60,
    ("minutes", "seconds"): 60,
    ("days", "hours"): 24,
    ("weeks", "days"): 7,
    ("feet", "inches"): 12,
    ("years", "months"): 12,
    ("dollars", "cents"): 100,
}


def _convert(x: str, src: str, dst: str) -> str:
    if (src, dst) in _UNIT_FACTORS:
        return f"{int(x) * _UNIT_FACTORS[src, dst]} {dst}"
    factor = _UNIT_FACTORS[dst, src]
    assert int(x) % factor == 0
    return f"{int(x) // factor} {dst}"


def _next_term(terms: str) -> str:
    t = [int(v) for v in terms.split(", ")]
    assert len(t) >= 3 and len({b - a for a, b in itertools.pairwise(t)}) == 1
    return str(2 * t[-1] - t[-2])


def _round(n: str, place: str) -> str:
    step, x = {"ten": 10, "hundred": 100}[place], int(n)
    below, above = x - x % step, x - x % step + step
    return str(above if above - x <= x - below else below)  # halves round up


# One independent solver per question form: family, regex over the question -> the one right answer.
_SOLVERS: list[tuple[str, str, Callable[..., str]]] = [
    ("addition", r"What is (\d+) \+ (\d+)\?", lambda a, b: str(int(a) + int(b))),
    ("subtraction", r"What is (\d+) - (\d+)\?", lambda a, b: str(int(a) - int(b))),
    ("multiplication", r"What is (\d+) × (\d+)\?", lambda a, b: str(int(a) * int(b))),
    ("unit_conversion", r"Convert (\d+) ([a-z]+) to ([a-z]+)\.", _convert),
    ("reverse", r"(?:Reverse the letters of '([a-z]+)'|Spell '([a-z]+)' backwards)\.", lambda a, b: (a or b)[::-1]),
    ("count_letter", r"How many times does the letter '([a-z])' appear in '([a-z]+)'\?", lambda c, w: str(w.count(c))),
    ("word_length", r"How many letters (?:are in|does) '([a-z]+)'(?: have)?\?", lambda w: str(len(w))),
    ("uppercase", r"Write '([a-z ]+)' in capital letters\.", str.upper),
    (
        "title_case",
        r"Capitalize the first letter of each word in '([a-z ]+)'\.",
        lambda p: " ".join(w[0].upper() + w[1:] for w in p.split()),
    ),
    ("sort_words", r"Sort these words alphabetically: ([a-z, ]+)\.", lambda ws: ", ".join(sorted(ws.split(", ")))),
    ("compare", r"Which is larger, (\d+) or (\d+)\?", lambda a, b: str(max(int(a), int(b)))),
    ("compare", r"Which is smaller, (\d+) or (\d+)\?", lambda a, b: str(min(int(a), int(b)))),
    ("rounding", r"Round (\d+) to the nearest (ten|hundred)\.", _round),
    ("sequence", r"What number comes next: ([\d, ]+)\?", _next_term),
]


def _solve(question: str) -> tuple[str, str]:
    """(family, the right answer) of a question."""
    for family, pattern, solver in _SOLVERS:
        if m := re.fullmatch(pattern, question):
            return family, solver(*m.groups())
    raise AssertionError(f"no solver parses {question!r}")


def _digest(pairs: list[dict]) -> str:
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {split: generate_pairs(split) for split in ("train", "test")}


def test_default_counts_and_unique_prompts(splits):
    assert len(splits["train"]) == 3000 and len(splits["test"]) == 300
    for pairs in splits.values():
        assert len({p["prompt"][0]["content"] for p in pairs}) == len(pairs)
    assert len(generate_pairs("train", n=17)) == 17


def test_no_prompt_shared_between_train_and_test(splits):
    train = {p["prompt"][0]["content"] for p in splits["train"]}
    assert not train & {p["prompt"][0]["content"] for p in splits["test"]}
    other_seed_test = {p["prompt"][0]["content"] for p in generate_pairs("test", seed=7)}
    assert not train & other_seed_test  # disjoint by construction, not by seed


def test_deterministic_per_seed(splits):
    assert _digest(generate_pairs("train")) == _digest(splits["train"])
    assert _digest(generate_pairs("train", n=200, seed=1)) != _digest(generate_pairs("train", n=200))
    assert _digest(generate_pairs("train", n=50, seed=3, conversational=False)) == _digest(
        generate_pairs("train", n=50, seed=3, conversational=False)
    )


def test_chosen_is_right_and_rejected_is_wrong(splits):
    for pair in splits["train"] + splits["test"]:
        _, answer = _solve(pair["prompt"][0]["content"])
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert chosen == answer, pair
        assert rejected != answer and rejected.strip(), pair


def test_families_in_equal_shares(splits):
    for pairs in splits.values():
        counts = Counter(_solve(p["prompt"][0]["content"])[0] for p in pairs)
        assert set(counts) == set(FAMILIES)
        assert max(counts.values()) - min(counts.values()) <= 1, counts


def test_conversational_form(splits):
    for pair in splits["test"]:
        assert set(pair) == {"prompt", "chosen", "rejected"}
        assert [m["role"] for m in pair["prompt"]] == ["user"]
        for side in ("chosen", "rejected"):
            assert len(pair[side]) == 1 and set(pair[side][0]) == {"role", "content"}
            assert pair[side][0]["role"] == "assistant"


def test_standard_form_matches_conversational():
    standard = generate_pairs("test", n=60, seed=5, conversational=False)
    chat = generate_pairs("test", n=60, seed=5)
    for s, c in zip(standard, chat, strict=True):
        assert all(isinstance(s[k], str) for k in ("prompt", "chosen", "rejected"))
        assert s["prompt"] == c["prompt"][0]["content"] + "\nAnswer:"
        assert s["chosen"] == " " + c["chosen"][0]["content"]
        assert s["rejected"] == " " + c["rejected"][0]["content"]


def test_lengths_are_short(splits):
    """~4 characters per token: questions stay well under 60 tokens, answers under 20."""
    for pair in splits["train"] + splits["test"]:
        assert len(pair["prompt"][0]["content"]) <= 100
        assert max(len(pair[s][0]["content"]) for s in ("chosen", "rejected")) <= 48


def test_builtin_dataset_path_writes_once(tmp_path):
    path = builtin_dataset_path("demo-test", tmp_path / "a")
    assert path == tmp_path / "a" / "datasets" / "demo-test.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == generate_pairs("test")
    mtime = path.stat().st_mtime_ns
    assert builtin_dataset_path("demo-test", tmp_path / "a") == path
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == ["demo-test.jsonl"]  # no temp file left behind
    assert builtin_dataset_path("demo-test", tmp_path / "b").read_bytes() == path.read_bytes()


def test_builtin_text_and_sized_variants(tmp_path):
    assert set(BUILTIN_DATASETS) == {"demo-train", "demo-test", "demo-train-text", "demo-test-text"}
    path = builtin_dataset_path("demo-train-text", tmp_path, n=40)
    assert path.name == "demo-train-text-40.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == generate_pairs("train", n=40, conversational=False)


def test_unknown_names_raise(tmp_path):
    with pytest.raises(PipelineError, match="builtin:demo-train, builtin:demo-test"):
        builtin_dataset_path("demo-val", tmp_path)
    with pytest.raises(PipelineError, match="split"):
        generate_pairs("validation")  # type: ignore[arg-type]
    with pytest.raises(PipelineError, match="ran out of distinct"):
        generate_pairs("test", n=5000)
