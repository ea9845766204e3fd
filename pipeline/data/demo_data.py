"""The builtin preference data: short questions with checkable answers, generated here, nothing downloaded.

    dpo-pipeline run --config configs/demo.yaml   # data: builtin:demo-train, held out: builtin:demo-test

Every pair is a question whose answer this module computes (chosen) and a plausible wrong answer made by
one of a few systematic mistakes of its task family (rejected): off by one, a swapped digit, the wrong
operation, the wrong unit factor, the word left unreversed, the other number of a comparison, ... The
mistakes are consistent across questions, so DPO on a small chat model learns to push them down and the
held-out reward accuracy rises within a few hundred pairs. Answers are bare and a few tokens long.

A prompt belongs to the test split exactly when a hash of its text falls in bucket 0 of 10, so train and
test never share a prompt, whatever the seed or sizes. Generation uses only a `random.Random` seeded with a
string (hashed with SHA-512, not `hash()`), so a seed gives byte-identical files on every run and machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pipeline.cache.storage import atomic_target, local_cache_dir
from pipeline.errors import PipelineError

# "-text" variants hold the same pairs in standard (plain text) form: no chat template, ~2.4x fewer tokens.
BUILTIN_DATASETS: tuple[str, ...] = ("demo-train", "demo-test", "demo-train-text", "demo-test-text")
DEFAULT_SIZES = {"train": 3000, "test": 300}
_TEST_BUCKETS = 10  # 1 in 10 of all possible prompts is held out
_MAX_DRAWS_PER_PAIR = 1000  # fresh-prompt attempts before a family counts as exhausted

# fmt: off
_WORDS = (
    "apple", "river", "garden", "planet", "window", "silver", "bottle", "candle", "rocket", "pencil",
    "orange", "tiger", "castle", "forest", "jacket", "monkey", "island", "winter", "summer", "button",
    "dragon", "market", "pillow", "saddle", "ticket", "violin", "wallet", "yellow", "zipper", "anchor",
    "basket", "carpet", "dinner", "engine", "falcon", "guitar", "hammer", "insect", "jungle", "kitten",
    "ladder", "magnet", "napkin", "oyster", "parrot", "quartz", "rabbit", "salmon", "turtle", "velvet",
    "walrus", "bridge", "cheese", "desert", "flower", "grape", "honey", "lemon", "mango", "night", "ocean",
    "piano", "queen", "robot", "snake", "table", "uncle", "video", "whale", "zebra", "bread", "chair",
    "cloud", "dance", "eagle", "frost", "ghost", "horse", "juice", "knife", "light", "mouse", "north",
    "olive", "pearl", "quiet", "radio", "stone", "train", "voice", "water", "youth", "beach", "candy",
    "daisy", "earth", "field", "glove", "house", "image", "jewel", "koala", "lunch", "metal", "nurse",
    "onion", "paint", "brick", "sheep", "tooth", "bell", "cake", "door", "fish", "gold", "hill", "king",
    "lamp", "moon", "nest", "rain", "ship", "tree", "wind", "wolf", "bird", "coin", "duck", "frog", "kite",
    "lake", "milk", "rose", "salt", "star", "sand", "leaf", "road", "snow", "farm", "banana", "blanket",
    "cabbage", "chicken", "dolphin", "feather", "giraffe", "harbor", "kitchen", "lantern", "library",
    "mirror", "morning", "octopus", "pumpkin", "rainbow", "sandwich", "teacher", "thunder", "tomato",
    "umbrella", "village", "blossom", "compass", "diamond", "elephant", "fountain", "hamster", "kangaroo",
    "lobster", "mountain", "necklace", "notebook", "painter", "penguin", "pepper", "picture", "pocket",
    "puzzle", "question", "balloon", "bicycle", "biscuit", "cactus", "camera", "canyon", "cherry", "circle",
    "coffee", "cookie", "cotton", "crayon", "dentist", "doctor", "donkey", "farmer", "finger", "garlic",
    "hockey", "jelly", "letter", "lizard", "meadow", "melon", "muffin", "noodle", "orchard", "pebble",
    "pirate", "saucer", "school", "shadow", "spider", "spring", "squirrel", "stream", "sugar", "sunset",
    "tunnel", "valley", "wagon", "wizard", "basil", "berry", "cabin", "camel", "cedar", "cobra", "coral",
    "crown", "globe", "heart", "jeans", "lemur", "maple", "medal", "otter", "panda", "peach", "pizza",
    "plum", "seal", "swan", "toad", "vase", "yarn", "goat", "bear", "deer", "crab",
)
_UNITS = (  # (larger unit, smaller unit, true factor, wrong factors a student might use)
    ("kilometers", "meters", 1000, (100, 10)),
    ("meters", "centimeters", 100, (1000, 10)),
    ("centimeters", "millimeters", 10, (100, 1000)),
    ("kilograms", "grams", 1000, (100, 10)),
    ("liters", "milliliters", 1000, (100, 10)),
    ("hours", "minutes", 60, (100, 24)),
    ("minutes", "seconds", 60, (100, 10)),
    ("days", "hours", 24, (12, 60)),
    ("weeks", "days", 7, (5, 10)),
    ("feet", "inches", 12, (10, 100)),
    ("years", "months", 12, (10, 52)),
    ("dollars", "cents", 100, (10, 1000)),
)
# fmt: on

Family = Callable[[random.Random], tuple[str, str, list[str]]]  # rng -> (question, answer, wrong answers)


# --- task families: each returns the question, its answer, and candidate wrong answers ---


def _swap_digits(n: int) -> int:
    """The last two digits exchanged (85 -> 58, 123 -> 132)."""
    s = str(n)
    return int(s[:-2] + s[-1] + s[-2]) if len(s) >= 2 else n


def _addition(rng: random.Random) -> tuple[str, str, list[str]]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    s = a + b
    wrong = (s + 1, s - 1, s + 10, _swap_digits(s), abs(a - b))  # off by one, dropped carry, swap, wrong op
    return f"What is {a} + {b}?", str(s), [str(w) for w in wrong]


def _subtraction(rng: random.Random) -> tuple[str, str, list[str]]:
    a = rng.randint(20, 99)
    b = rng.randint(10, a - 1)
    d = a - b
    return f"What is {a} - {b}?", str(d), [str(w) for w in (d + 1, d - 1, d + 10, _swap_digits(d), a + b)]


def _multiplication(rng: random.Random) -> tuple[str, str, list[str]]:
    a, b = rng.randint(2, 12), rng.randint(2, 50)
    p = a * b
    return f"What is {a} × {b}?", str(p), [str(w) for w in (a * (b + 1), a * (b - 1), a + b, p + 1)]


def _unit_conversion(rng: random.Random) -> tuple[str, str, list[str]]:
    big, small, factor, wrong_factors = rng.choice(_UNITS)
    x = rng.randint(2, 99)
    if rng.random() < 0.5:
        return (
            f"Convert {x} {big} to {small}.",
            f"{x * factor} {small}",
            [*(f"{x * f} {small}" for f in wrong_factors), f"{x} {small}"],
        )  # wrong factor, unconverted
    wrong = [f"{x * factor // f} {big}" for f in wrong_factors if x * factor % f == 0]
    return f"Convert {x * factor} {small} to {big}.", f"{x} {big}", [*wrong, f"{x * factor} {big}"]


def _reverse(rng: random.Random) -> tuple[str, str, list[str]]:
    word = rng.choice(_WORDS)
    rev = word[::-1]
    i = rng.randrange(len(rev) - 1)
    one_swap = rev[:i] + rev[i + 1] + rev[i] + rev[i + 2 :]
    template = rng.choice(("Reverse the letters of '{}'.", "Spell '{}' backwards."))
    return template.format(word), rev, [word, one_swap]


def _count_letter(rng: random.Random) -> tuple[str, str, list[str]]:
    word = rng.choice(_WORDS)
    letter = rng.choice(word)
    c = word.count(letter)
    return f"How many times does the letter '{letter}' appear in '{word}'?", str(c), [str(c + 1), str(c - 1)]


def _word_length(rng: random.Random) -> tuple[str, str, list[str]]:
    word = rng.choice(_WORDS)
    template = rng.choice(("How many letters are in '{}'?", "How many letters does '{}' have?"))
    return template.format(word), str(len(word)), [str(len(word) + 1), str(len(word) - 1)]


def _uppercase(rng: random.Random) -> tuple[str, str, list[str]]:
    phrase = " ".join(rng.sample(_WORDS, 2))
    return f"Write '{phrase}' in capital letters.", phrase.upper(), [phrase.title(), phrase.capitalize()]


def _title_case(rng: random.Random) -> tuple[str, str, list[str]]:
    phrase = " ".join(rng.sample(_WORDS, 2))
    return (
        f"Capitalize the first letter of each word in '{phrase}'.",
        phrase.title(),
        [phrase.upper(), phrase.capitalize()],
    )


def _sort_words(rng: random.Random) -> tuple[str, str, list[str]]:
    words = rng.sample(_WORDS, rng.choice((3, 4)))
    ordered = sorted(words)
    wrong = [ordered[::-1], words]  # reverse order, left unsorted
    return (f"Sort these words alphabetically: {', '.join(words)}.", ", ".join(ordered), [", ".join(w) for w in wrong])


def _compare(rng: random.Random) -> tuple[str, str, list[str]]:
    a, b = rng.sample(range(10, 1000), 2)
    larger = rng.random() < 0.5
    answer, other = (max(a, b), min(a, b)) if larger else (min(a, b), max(a, b))
    return f"Which is {'larger' if larger else 'smaller'}, {a} or {b}?", str(answer), [str(other)]


def _rounding(rng: random.Random) -> tuple[str, str, list[str]]:
    place, wrong_place = rng.choice(((10, 100), (100, 10)))
    n = place * rng.randint(1000 // place, 9999 // place - 1) + rng.randint(1, place - 1)
    down = n // place * place
    answer = down + place if n - down >= place / 2 else down
    wrong = (
        down if answer > down else down + place,  # rounded the wrong way
        (n + wrong_place // 2) // wrong_place * wrong_place,
    )  # to the wrong place
    return (f"Round {n} to the nearest {'ten' if place == 10 else 'hundred'}.", str(answer), [str(w) for w in wrong])


def _sequence(rng: random.Random) -> tuple[str, str, list[str]]:
    start, step = rng.randint(1, 99), rng.randint(2, 15)
    terms = [start + k * step for k in range(4)]
    nxt = terms[-1] + step
    return (
        f"What number comes next: {', '.join(map(str, terms))}?",
        str(nxt),
        [str(w) for w in (nxt + 1, nxt - 1, nxt + step, terms[-1])],
    )


FAMILIES: dict[str, Family] = {
    "addition": _addition,
    "subtraction": _subtraction,
    "multiplication": _multiplication,
    "unit_conversion": _unit_conversion,
    "reverse": _reverse,
    "count_letter": _count_letter,
    "word_length": _word_length,
    "uppercase": _uppercase,
    "title_case": _title_case,
    "sort_words": _sort_words,
    "compare": _compare,
    "rounding": _rounding,
    "sequence": _sequence,
}


# --- pairs ---


def _split_of(question: str) -> Literal["train", "test"]:
    digest = hashlib.blake2b(question.encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % _TEST_BUCKETS == 0 else "train"


def generate_pairs(
    split: Literal["train", "test"], n: int | None = None, seed: int = 0, conversational: bool = True
) -> list[dict]:
    """`n` preference pairs (default 3000 train, 300 test), families in equal shares, unique prompts.

    Conversational: `{"prompt": [user msg], "chosen": [assistant msg], "rejected": [assistant msg]}`.
    Standard: `{"prompt": "<question>\\nAnswer:", "chosen": " <answer>", "rejected": " <wrong answer>"}`.
    """
    if split not in DEFAULT_SIZES:
        raise PipelineError(f"split must be one of {sorted(DEFAULT_SIZES)}, not {split!r}")
    n = DEFAULT_SIZES[split] if n is None else n
    if n < 0:
        raise PipelineError(f"n must be >= 0, not {n}")
    rng = random.Random(f"dpo-pipeline-demo:{split}:{seed}")
    families = list(FAMILIES.items())
    seen: set[str] = set()
    pairs = []
    for i in range(n):
        name, family = families[i % len(families)]
        for _ in range(_MAX_DRAWS_PER_PAIR):
            question, answer, wrong = family(rng)
            if question not in seen and _split_of(question) == split:
                break
        else:
            raise PipelineError(
                f"the builtin {split} split ran out of distinct {name} prompts at {i} pairs; ask for fewer than {n}"
            )
        seen.add(question)
        rejected = rng.choice(sorted({w for w in wrong if w != answer}))
        pairs.append(_format(question, answer, rejected, conversational))
    rng.shuffle(pairs)
    return pairs


def _format(question: str, chosen: str, rejected: str, conversational: bool) -> dict:
    if conversational:
        return {
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    return {"prompt": f"{question}\nAnswer:", "chosen": f" {chosen}", "rejected": f" {rejected}"}


def builtin_dataset_path(name: str, cache_dir: str | os.PathLike, n: int | None = None) -> Path:
    """`<cache_dir>/datasets/<name>.jsonl` for a builtin name (default size, seed 0; conversational form, or
    standard form for the -text names; `n` pairs instead of the default size), written once, atomically,
    and reused afterwards."""
    if name not in BUILTIN_DATASETS:
        raise PipelineError(
            f"unknown builtin dataset {name!r}; valid names: {', '.join('builtin:' + b for b in BUILTIN_DATASETS)}"
        )
    path = local_cache_dir(cache_dir) / "datasets" / (f"{name}.jsonl" if n is None else f"{name}-{n}.jsonl")
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    split: Literal["train", "test"] = "train" if name.startswith("demo-train") else "test"
    pairs = generate_pairs(split, n, conversational=not name.endswith("-text"))
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    with atomic_target(path) as tmp:
        tmp.write_text(lines, encoding="utf-8")
    return path
