"""The builtin questions' checkers: every family recognised from its wording, hand-written generations read by
each family's rule, and the real generators' answers right, while their systematic mistakes and every generation
that does not give exactly one answer (hedged, listed, ranged, self-corrected, echoed, glued) are wrong."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from pipeline.data.demo_data import FAMILIES
from pipeline.evaluate.answers import _QUESTIONS, is_correct, task_family

# (family, expected, generations that give it, generations that do not: each mistake of the family's generator,
# then decorations the family's rule refuses and answers that are not exactly one: hedges, lists, ranges,
# self-corrections, echoed questions, glued numbers)
CASES = [
    (  # What is 12 + 44?
        "addition",
        "56",
        [
            *(" 56", "56.", "56\nQuestion: What is 1 + 2?\nAnswer: 3", "\n 56 ", "The answer is 56.", "056", "56.0"),
            *("12 + 44 = 56", "12 + 44 = 56. The answer is 56", "56. The answer is 56.", "Answer: 56, 56"),
        ],
        [
            *("57", "55", "66", "65", "32", "Let me see.\n56", "12 + 44 = 57", "56.5", "-56", "fifty-six"),
            *("56 or 57", "57 or 56", "maybe 56", "about 56", "It is not 56.", "56? Wait.", "56, or so"),  # hedges
            *("56, 57", "55, 56, 57", "56 57", "Between 55 and 57.", "55-57", "56 to 60"),  # lists and ranges
            *("57, no, 56", "56? No, 57.", "57. Sorry, 56.", "56 = 57"),  # self-corrections
            *("What is 12 + 44? 56", "12 + 44? 56"),  # echoes
            *("56e3", "x56", "56abc", "56_", "5,6", "56, 57abc", "56, x56"),  # glued numbers
        ],
    ),
    (  # What is 75 - 23?
        "subtraction",
        " 52",
        ["52", " 52.\n", "75 - 23 = 52"],
        ["53", "51", "62", "25", "98", "-52", "52 or 53", "52, 53", "What is 75 - 23? 52", "52nd", "51 to 53"],
    ),
    (  # What is 7 × 8?
        "multiplication",
        "56",
        ["56", "7 × 8 = 56", "56. 56."],
        ["63", "49", "15", "57", "56 (7 times 8)", "around 56", "56? No, 57.", "What is 7 × 8? 56", "56x"],
    ),
    (  # Convert 5 kilometers to meters.
        "unit_conversion",
        "5000 meters",
        [
            *(" 5000 meters", "5,000 meters.", "5000 Meters\nsince 1 km is 1000 m", "The answer is 5000 meters."),
            *("5 km = 5000 meters", "5000 meters. That is 5000 meters."),
        ],
        [
            *("500 meters", "50 meters", "5 meters", "5000", "5000 m", "5000meters", "5000 kilometers"),
            *("5000 meters or 500 meters", "roughly 5000 meters", "5000 meters, 500 meters", "5000 meters (5 km)"),
            *("4000 to 5000 meters", "500 meters? No, 5000 meters.", "Convert 5 kilometers to meters. 5000 meters"),
            *("x5000 meters", "5000e3 meters", "5000 meters1", "5000 metersabc", "5000 meters, 5000 m"),
        ],
    ),
    (  # Convert 120 minutes to hours.
        "unit_conversion",
        " 2 hours",
        ["2 hours.", "2 HOURS"],
        ["12 hours", "120 hours", "2 minutes", "2 hours or 120 minutes", "2 hours = 120 minutes"],
    ),
    (  # Reverse the letters of 'river'.
        "reverse",
        "revir",
        [" revir", "Revir.", "'revir'", "REVIR", "revir\n(river backwards)", "The answer is revir", "revir. Revir."],
        [
            *("river", "ervir", "rveir", "reivr", "revri", "r e v i r", "revirs", "rev ir", "revir!"),
            *("revir or river", "river or revir", "perhaps revir", "revir, river", "revir river", "revir. river."),
            *("revir is river backwards", "river? No, revir.", "Reverse the letters of 'river'. revir"),
            *("revir1", "xrevir", "revir_"),
        ],
    ),
    (  # How many times does the letter 'p' appear in 'apple'?
        "count_letter",
        "2",
        [" 2", "2 times.", "2\n", "The letter 'p' appears 2 times."],
        [
            *("3", "1", "two", "0", "12", "2 or 3", "2, 3", "1-2", "2? No, 3.", "2 times, not 3"),
            *("How many times does the letter 'p' appear in 'apple'? 2", "2x", "2nd"),
        ],
    ),
    (  # How many letters are in 'garden'?
        "word_length",
        " 6",
        ["6", "6 letters", "garden has 6 letters"],
        ["7", "5", "six", "6 or 7", "about 6", "6, 7", "How many letters are in 'garden'? 6", "6th"],
    ),
    (  # Write 'apple river' in capital letters.
        "uppercase",
        "APPLE RIVER",
        [" APPLE RIVER", "APPLE RIVER.", "'APPLE RIVER'", '"APPLE  RIVER".\nDone!', "The answer is APPLE RIVER."],
        [
            *("Apple River", "Apple river", "apple river", "APPLE", "APPLERIVER", "APPLE RIVER, done", "APPLE RIVER!"),
            *(
                "APPLE RIVER or Apple River",
                "APPLE RIVER. Apple River.",
                "Write 'apple river' in capital letters. APPLE RIVER",
            ),
            *("APPLE RIVER1", "APPLE RIVERS"),
        ],
    ),
    (  # Capitalize the first letter of each word in 'apple river'.
        "title_case",
        " Apple River",
        ["Apple River", " Apple River.\nEach word starts with a capital.", "Apple River. Apple River."],
        [
            *("APPLE RIVER", "Apple river", "apple river", "Apple River Is The Answer", "Apple"),
            *("Apple River or APPLE RIVER", "Apple River, APPLE RIVER", "Apple River? No, APPLE RIVER."),
            *("Capitalize the first letter of each word in 'apple river'. Apple River", "xApple River"),
        ],
    ),
    (  # Sort these words alphabetically: river, apple, garden.
        "sort_words",
        "apple, garden, river",
        [
            *(" apple, garden, river.", "Apple, Garden, River", "apple,garden , river\nThese are in order."),
            *("'apple', 'garden', 'river'", "The answer is: apple, garden, river."),
        ],
        [
            *("river, garden, apple", "river, apple, garden", "apple garden river", "apple, garden and river"),
            *("apple, garden", "apple, garden, river, zebra", "apple, , garden, river"),
            *("apple, garden, river or river, garden, apple", "apple, garden, river. river, garden, apple."),
            *("Sort these words alphabetically: river, apple, garden. apple, garden, river", "apple, garden, river2"),
        ],
    ),
    (  # Which is larger, 123 or 456?
        "compare",
        "456",
        ["456 is larger.", " 456\n", "456. The larger is 456."],
        [
            *(
                "123",
                "123 is smaller, so 456",
                "456 is larger than 123",
                "456 or 123",
                "Which is larger, 123 or 456? 456",
            ),
            *("123? No, 456.", "456, 123", "456abc"),
        ],
    ),
    (  # Round 4567 to the nearest hundred.
        "rounding",
        "4600",
        ["4,600", " 4600.", "4600.0"],
        [
            *("4500", "4570", "4567", "46", "4600 or 4570", "4500-4600", "between 4500 and 4600"),
            *("Round 4567 to the nearest hundred. 4600", "4567 rounds to 4600", "4600 (4567 rounded)", "4,6000"),
        ],
    ),
    (  # What number comes next: 3, 7, 11, 15?
        "sequence",
        "19",
        [" 19", "19.", "15 + 4 = 19"],
        [
            *("20", "18", "23", "15", "3, 7, 11, 15, 19", "19, then 23", "19 or 20", "19? No, 23."),
            *("What number comes next: 3, 7, 11, 15? 19", "19th"),
        ],
    ),
]


@pytest.mark.parametrize(("family", "expected", "right", "wrong"), CASES, ids=[c[0] for c in CASES])
def test_hand_written_generations(family, expected, right, wrong):
    for generation in [expected, *right]:
        assert is_correct(family, expected, generation), generation
    for generation in ["", " \n\n", ".", *wrong]:
        assert not is_correct(family, expected, generation), generation


def test_every_family_has_hand_written_cases():
    assert {c[0] for c in CASES} == set(FAMILIES)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_real_questions_answers_and_mistakes(name):
    rng = random.Random(f"answers:{name}")
    for _ in range(40):
        question, answer, wrong = FAMILIES[name](rng)
        chat = (
            f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        )
        for prompt in (question, f"{question}\nAnswer:", chat, f"<s>[INST] {question} [/INST]"):
            assert task_family(prompt) == name, prompt
        assert [other for other, pattern in _QUESTIONS.items() if pattern.search(question)] == [name]
        for expected in (answer, f" {answer}"):
            assert is_correct(name, expected, answer)
            assert is_correct(name, expected, f" {answer}\n")
            assert is_correct(name, expected, f" {answer}.\nQuestion: What is 1 + 1?")
            for plain in (f"{answer}.", f"The answer is {answer}.", f"{answer}. The answer is {answer}."):
                assert is_correct(name, expected, plain), (question, plain)
        for mistake in sorted({w for w in wrong if w != answer}):
            assert not is_correct(name, answer, mistake), (question, mistake)
            assert not is_correct(name, f" {answer}", f" {mistake}\n{answer}"), (question, mistake)
            for generation in not_one_answer(question, answer, mistake):
                assert not is_correct(name, answer, generation), (question, generation)


def not_one_answer(question: str, answer: str, other: str) -> list[str]:
    """Generations that hold `answer` but do not give exactly it: with the `other` answer, or malformed."""
    return [
        *(f"{answer} or {other}", f"{other} or {answer}", f"maybe {answer}", f"not {answer}"),  # hedges
        *(f"{answer}, {other}", f"{other}, {answer}.", f"from {other} to {answer}"),  # a list, a range
        *(f"{other}? No, {answer}.", f"{answer}. Wait, {other}.", f"{answer}. {other}."),  # self-corrections
        *(f"{question} {answer}", f"{answer}. {question}"),  # echoes
        *(f"x{answer}", f"{answer}abc", f"{answer}e3", f"{answer}_"),  # glued
    ]


def test_other_prompts_have_no_family(hh_rlhf: Path):
    for prompt in ["", "Answer:", "What is 12 plus 34?", "\n\nHuman: What is the capital of France?\n\nAssistant:"]:
        assert task_family(prompt) is None, prompt
    with gzip.open(hh_rlhf, "rt", encoding="utf-8") as f:
        dialogues = [json.loads(line)["chosen"] for line in f]
    assert len(dialogues) > 1000
    assert [d for d in dialogues if task_family(d) is not None] == []


def test_unreadable_expected_or_unknown_family_raise():
    with pytest.raises(ValueError, match="does not read"):
        is_correct("addition", "fifty-six", "56")
    with pytest.raises(KeyError):
        is_correct("poetry", "56", "56")
