"""The builtin questions' own checkers: which task family a prompt asks, and whether a generation answers it.

A generation's answer is its first non-blank line; what follows that line never counts. Both the expected
answer (the chosen completion) and the generation are read by the family's rule below, and the generation is
right when the two readings are equal; an empty or unreadable generation is wrong. Per family:

    addition, subtraction, multiplication, count_letter, word_length, compare, rounding, sequence:
        the first number in the line after its last "=" (the whole line without one), by value ("56", " 56.",
        "The answer is 56.", "056", "56.0" and "5,600" read as numbers; "-56" and "56.5" are other numbers;
        "12 + 44 = 56" reads 56; "fifty-six" is none)
    unit_conversion: the first number, by value, and the word after it (past a space), any case ("5,000 Meters."
        is right; "5000", "5000 m" and "5000meters" are not)
    reverse: the first word (run of letters), any case ("Elppa." is right; "The answer is elppa" reads "the")
    uppercase, title_case: the whole line, case-sensitive, quotes and a final period around it dropped and
        whitespace collapsed ("'APPLE RIVER'." is right; "Apple River" and "APPLE RIVER, done" are not)
    sort_words: the whole line, a final period dropped, split at commas, each item stripped, any case
        ("Apple, banana, cherry." is right; "apple banana cherry" and "apple, banana and cherry" are not)

Every systematic mistake the generators in `pipeline.data.demo_data` make stays wrong under these readings.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal

# One regex per family over the question's wording, searched anywhere in a prompt (plain or chat-rendered).
_QUESTIONS = {
    "addition": re.compile(r"What is \d+ \+ \d+\?"),
    "subtraction": re.compile(r"What is \d+ - \d+\?"),
    "multiplication": re.compile(r"What is \d+ × \d+\?"),
    "unit_conversion": re.compile(r"Convert \d+ [a-z]+ to [a-z]+\."),
    "reverse": re.compile(r"(?:Reverse the letters of '[a-z]+'|Spell '[a-z]+' backwards)\."),
    "count_letter": re.compile(r"How many times does the letter '[a-z]' appear in '[a-z]+'\?"),
    "word_length": re.compile(r"How many letters (?:are in '[a-z]+'|does '[a-z]+' have)\?"),
    "uppercase": re.compile(r"Write '[a-z]+(?: [a-z]+)*' in capital letters\."),
    "title_case": re.compile(r"Capitalize the first letter of each word in '[a-z]+(?: [a-z]+)*'\."),
    "sort_words": re.compile(r"Sort these words alphabetically: [a-z]+(?:, [a-z]+)+\."),
    "compare": re.compile(r"Which is (?:larger|smaller), \d+ or \d+\?"),
    "rounding": re.compile(r"Round \d+ to the nearest (?:ten|hundred)\."),
    "sequence": re.compile(r"What number comes next: \d+(?:, \d+)+\?"),
}
_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?"  # optional sign, thousands commas, decimals; "56." is 56 and a period


def task_family(prompt: str) -> str | None:
    """The `pipeline.data.demo_data.FAMILIES` name of the builtin question in `prompt`, or None if it holds none."""
    return next((name for name, question in _QUESTIONS.items() if question.search(prompt)), None)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _number(line: str) -> Decimal | None:
    m = re.search(_NUMBER, line.rsplit("=", 1)[-1])  # a worked answer ("80 + 53 = 133") gives its result
    return Decimal(m[0].replace(",", "")) if m else None


def _quantity(line: str) -> tuple[Decimal, str] | None:
    m = re.search(rf"({_NUMBER})(?:\s+([A-Za-z]+))?", line)  # the first number, and the word after it if any
    return (Decimal(m[1].replace(",", "")), m[2].lower()) if m and m[2] else None


def _word(line: str) -> str | None:
    m = re.search(r"[A-Za-z]+", line)
    return m[0].lower() if m else None


def _phrase(line: str) -> str | None:
    return " ".join(line.strip("'\". ").split()) or None


def _word_list(line: str) -> tuple[str, ...] | None:
    items = tuple(item.strip().lower() for item in line.rstrip(".").split(","))
    return items if all(items) else None


_READERS: dict[str, Callable[[str], object]] = {
    "addition": _number,
    "subtraction": _number,
    "multiplication": _number,
    "unit_conversion": _quantity,
    "reverse": _word,
    "count_letter": _number,
    "word_length": _number,
    "uppercase": _phrase,
    "title_case": _phrase,
    "sort_words": _word_list,
    "compare": _number,
    "rounding": _number,
    "sequence": _number,
}


def is_correct(family: str, expected: str, generation: str) -> bool:
    """Whether `generation` gives the `expected` answer (the chosen completion) by `family`'s rule (see above).

    KeyError for a family not in `pipeline.data.demo_data.FAMILIES`; ValueError when `expected` does not read."""
    read = _READERS[family]
    want = read(_first_line(expected))
    if want is None:
        raise ValueError(f"the expected {family} answer {expected!r} does not read as one")
    return read(_first_line(generation)) == want
