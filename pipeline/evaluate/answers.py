"""The builtin questions' own checkers: which task family a prompt asks, and whether a generation answers it.

A generation is right only when it gives exactly one answer and that answer is the expected one (the chosen
completion, read by the same rule). Its answer is its first non-blank line; what follows never counts. The line
is wrong outright when it hedges (a word such as "or", "maybe", "about", "not", "no", "wait") or echoes a builtin
question. Otherwise the family's rule reads every candidate answer in the line, and the line gives one answer
when it has at least one candidate, all of them read and all the same: two different ones (a list, a range, a
self-correction such as "133? No, 134.") are wrong, the same one repeated ("133. The answer is 133.") is right.
Number families read every number after the line's last "=" (the whole line without one), so a worked answer
("80 + 53 = 133") gives its result; a number reads by value ("056", "56.0", "5,600"; "56." is 56 and a period)
and a digit glued to other characters ("133e3", "x133", "133abc") is unreadable. Word families read every
sentence of the line, a lead ("The answer is", "Answer:"), surrounding quotes and a final period dropped, as the
whole answer. Per family (question: right forms; wrong forms):

    addition: numbers ("What is 12 + 44?": "56", "The answer is 56.", "12 + 44 = 56"; "56 or 57", "55-57")
    subtraction: numbers ("What is 75 - 23?": "52", " 52."; "-52", "52, 53")
    multiplication: numbers ("What is 7 × 8?": "56", "7 × 8 = 56"; "56 (7 times 8)", "56abc")
    unit_conversion: numbers, each with the word after it, any case ("Convert 5 kilometers to meters.":
        "5,000 Meters.", "5 km = 5000 meters"; "5000", "5000 m", "5000meters", "5000 meters (5 km)")
    reverse: sentences, one word, any case ("Reverse the letters of 'apple'.": "Elppa.", "The answer is 'elppa'";
        "elppa is apple backwards", "elppa or apple")
    count_letter: numbers ("How many times does the letter 'p' appear in 'apple'?": "2 times."; "2 or 3", "two")
    word_length: numbers ("How many letters are in 'garden'?": "6 letters"; "6, 7", "about 6")
    uppercase: sentences, case-sensitive, whitespace collapsed ("Write 'apple river' in capital letters.":
        "'APPLE RIVER'."; "Apple River", "APPLE RIVER, done")
    title_case: sentences as uppercase ("Capitalize the first letter of each word in 'apple river'.":
        "Apple River."; "APPLE RIVER", "Apple River Is The Answer")
    sort_words: sentences, split at commas, each item stripped of spaces and quotes, any case ("Sort these words
        alphabetically: cherry, apple, banana.": "Apple, banana, cherry."; "apple banana cherry",
        "apple, banana and cherry")
    compare: numbers ("Which is larger, 123 or 456?": "456 is larger."; "456 is larger than 123")
    rounding: numbers ("Round 4567 to the nearest hundred.": "4,600"; "4600 or 4570", "4500-4600")
    sequence: numbers ("What number comes next: 3, 7, 11, 15?": "19"; "19, then 23", "3, 7, 11, 15, 19")

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
_HEDGE = re.compile(
    r"\b(?:or|either|between|maybe|perhaps|probably|possibly|about|around|approximately|roughly|nearly|almost"
    r"|not|no|wait)\b|n't\b",
    re.IGNORECASE,
)
# A whole number token: optional sign, thousands commas, decimals; "56." is 56 and a period. No letter, digit or
# underscore may touch it, so "133e3", "x133" and "133abc" hold none (and their digits make the line unreadable).
_NUMBER = r"(?<!\w)-?\d+(?:,\d{3})*(?:\.\d+)?(?!\w|[.,]\d)"
_QUANTITY = re.compile(rf"({_NUMBER})(?:\s+([A-Za-z]+)(?!\w))?")  # a number and the word after it, if any
_LEAD = re.compile(r"^(?:the )?answer(?: is)?:?\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

Reader = Callable[[str], list[object]]  # an answer line -> its candidate answers, None for an unreadable one


def task_family(prompt: str) -> str | None:
    """The `pipeline.data.demo_data.FAMILIES` name of the builtin question in `prompt`, or None if it holds none."""
    return next((name for name, question in _QUESTIONS.items() if question.search(prompt)), None)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _quantities(line: str) -> list[tuple[Decimal, str | None]] | None:
    """Each number after the line's last "=" with the word after it (lower case); None when a digit is glued."""
    result = line.rsplit("=", 1)[-1]
    if re.search(r"\d", _QUANTITY.sub(" ", result)):
        return None
    return [(Decimal(m[1].replace(",", "")), m[2] and m[2].lower()) for m in _QUANTITY.finditer(result)]


def _numbers(line: str) -> list[object]:
    found = _quantities(line)
    return [None] if found is None else [value for value, _ in found]


def _units(line: str) -> list[object]:
    found = _quantities(line)
    return [None] if found is None else [q if q[1] else None for q in found]


def _sentences(line: str) -> list[str]:
    """Each sentence of the line without its lead, surrounding quotes and final period, whitespace collapsed."""
    return [" ".join(_LEAD.sub("", s, count=1).strip("'\". ").split()) for s in _SENTENCE_END.split(line)]


def _word(line: str) -> list[object]:
    return [s.lower() if re.fullmatch(r"[A-Za-z]+", s) else None for s in _sentences(line)]


def _phrase(line: str) -> list[object]:
    return [s or None for s in _sentences(line)]


def _word_list(line: str) -> list[object]:
    lists = [tuple(item.strip(" '\"").lower() for item in s.split(",")) for s in _sentences(line)]
    return [items if all(items) else None for items in lists]


_READERS: dict[str, Reader] = {
    "addition": _numbers,
    "subtraction": _numbers,
    "multiplication": _numbers,
    "unit_conversion": _units,
    "reverse": _word,
    "count_letter": _numbers,
    "word_length": _numbers,
    "uppercase": _phrase,
    "title_case": _phrase,
    "sort_words": _word_list,
    "compare": _numbers,
    "rounding": _numbers,
    "sequence": _numbers,
}


def _answer(read: Reader, line: str) -> object | None:
    """The one answer `line` gives, or None: no candidate, an unreadable one, or two different ones."""
    candidates = read(line)
    return candidates[0] if candidates and all(c == candidates[0] for c in candidates) else None


def is_correct(family: str, expected: str, generation: str) -> bool:
    """Whether `generation` gives exactly one answer, the `expected` one (the chosen completion), by `family`'s
    rule (see above).

    KeyError for a family not in `pipeline.data.demo_data.FAMILIES`; ValueError when `expected` does not read."""
    read = _READERS[family]
    want = _answer(read, _first_line(expected))
    if want is None:
        raise ValueError(f"the expected {family} answer {expected!r} does not read as one")
    line = _first_line(generation)
    if _HEDGE.search(line) or any(question.search(line) for question in _QUESTIONS.values()):
        return False
    return _answer(read, line) == want
