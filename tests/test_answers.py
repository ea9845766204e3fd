"""The builtin questions' checkers: every family recognised from its wording, hand-written generations read by
each family's rule, and the real generators' answers right and their systematic mistakes wrong."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from pipeline.data.demo_data import FAMILIES
from pipeline.evaluate.answers import _QUESTIONS, is_correct, task_family

# (family, expected, generations that give it, generations that do not: each mistake of the family's generator,
# then decorations the family's rule refuses)
CASES = [
    (  # What is 12 + 44?
        "addition",
        "56",
        [
            *(" 56", "56.", "56\nQuestion: What is 1 + 2?\nAnswer: 3", "\n 56 ", "The answer is 56.", "056", "56.0"),
            *("12 + 44 = 56", "12 + 44 = 56. The answer is 56"),  # a worked sum: the number after its last "="
        ],
        ["57", "55", "66", "65", "32", "57, no, 56", "Let me see.\n56", "12 + 44 = 57", "56.5", "-56", "fifty-six"],
    ),
    ("subtraction", " 52", ["52", " 52.\n"], ["53", "51", "62", "25", "98", "-52"]),  # What is 75 - 23?
    ("multiplication", "56", ["56 (7 times 8)"], ["63", "49", "15", "57"]),  # What is 7 × 8?
    (  # Convert 5 kilometers to meters.
        "unit_conversion",
        "5000 meters",
        [" 5000 meters", "5,000 meters.", "5000 Meters\nsince 1 km is 1000 m", "The answer is 5000 meters."],
        [
            "500 meters",
            "50 meters",
            "5 meters",
            "5000",
            "5000 m",
            "5000meters",
            "5000 kilometers",
            "5 km = 5000 meters",
        ],
    ),
    ("unit_conversion", " 2 hours", ["2 hours.", "2 HOURS"], ["12 hours", "120 hours", "2 minutes"]),  # 120 minutes
    (  # Reverse the letters of 'river'.
        "reverse",
        "revir",
        [" revir", "Revir.", "'revir'", "REVIR", "revir\n(river backwards)", "revir is river backwards"],
        ["river", "ervir", "rveir", "reivr", "revri", "The answer is revir", "r e v i r", "revirs", "rev ir"],
    ),
    (  # How many times does the letter 'p' appear in 'apple'?
        "count_letter",
        "2",
        [" 2", "2 times.", "2\n"],
        ["3", "1", "two", "0", "12"],
    ),
    ("word_length", " 6", ["6", "6 letters"], ["7", "5", "six"]),  # How many letters are in 'garden'?
    (  # Write 'apple river' in capital letters.
        "uppercase",
        "APPLE RIVER",
        [" APPLE RIVER", "APPLE RIVER.", "'APPLE RIVER'", '"APPLE  RIVER".\nDone!'],
        ["Apple River", "Apple river", "apple river", "APPLE", "APPLERIVER", "APPLE RIVER, done", "APPLE RIVER!"],
    ),
    (  # Capitalize the first letter of each word in 'apple river'.
        "title_case",
        " Apple River",
        ["Apple River", " Apple River.\nEach word starts with a capital."],
        ["APPLE RIVER", "Apple river", "apple river", "Apple River Is The Answer", "Apple"],
    ),
    (  # Sort these words alphabetically: river, apple, garden.
        "sort_words",
        "apple, garden, river",
        [" apple, garden, river.", "Apple, Garden, River", "apple,garden , river\nThese are in order."],
        [
            "river, garden, apple",
            "river, apple, garden",
            "apple garden river",
            "apple, garden and river",
            "apple, garden",
            "apple, garden, river, zebra",
            "apple, , garden, river",
        ],
    ),
    ("compare", "456", ["456 is larger.", " 456\n"], ["123", "123 is smaller, so 456"]),  # larger, 123 or 456?
    ("rounding", "4600", ["4,600", " 4600."], ["4500", "4570", "4567", "46"]),  # Round 4567 to the nearest hundred.
    ("sequence", "19", [" 19", "19, then 23"], ["20", "18", "23", "15", "3, 7, 11, 15, 19"]),  # 3, 7, 11, 15
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
        for mistake in {w for w in wrong if w != answer}:
            assert not is_correct(name, answer, mistake), (question, mistake)
            assert not is_correct(name, f" {answer}", f" {mistake}\n{answer}"), (question, mistake)


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
