"""Tokenization against ids worked out independently: hand-listed tokens, or the tokenizer applied to
the literal text the TRL rules produce (never by calling our tokenization code for the expectation)."""

from __future__ import annotations

import json

import pytest

from pipeline.data.tokenization import (
    EMPTY_COMPLETION,
    IDENTICAL_COMPLETIONS,
    PROMPT_TOO_LONG,
    Drop,
    RowError,
    extract_prompt,
    pair_id,
    parse_record,
    tokenize_row,
    truncate,
)

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def test_standard_explicit_hand_worked(tokenizer):
    # "What is 2+2?" + " 4" + EOS, BPE pieces written out by hand (Ġ = leading space).
    pieces = ["What", "Ġis", "Ġ", "2", "+", "2", "?", "Ġ", "4", "<|im_end|>"]
    expected = tokenizer.convert_tokens_to_ids(pieces)
    out = tokenize_row({"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"}, tokenizer, 1024)
    assert out.chosen_input_ids == expected
    assert out.rejected_input_ids == expected[:-2] + tokenizer.convert_tokens_to_ids(["5", "<|im_end|>"])
    assert out.chosen_completion_start == out.rejected_completion_start == 7 == out.prompt_len
    assert not out.truncated and not out.prompt_merged


def test_standard_eos_not_doubled(tokenizer):
    out = tokenize_row({"prompt": "Q:", "chosen": " a<|im_end|>", "rejected": " b"}, tokenizer, None)
    assert out.chosen_input_ids == ids(tokenizer, "Q: a<|im_end|>")
    assert out.rejected_input_ids == ids(tokenizer, "Q: b<|im_end|>")


def test_standard_implicit_prompt_hh_style(tokenizer):
    chosen = "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water and yeast."
    rejected = "\n\nHuman: How do I bake bread?\n\nAssistant: I won't help."
    out = tokenize_row({"chosen": chosen, "rejected": rejected}, tokenizer, 1024)
    prompt = "\n\nHuman: How do I bake bread?\n\nAssistant:"  # trailing space moves to the completions
    assert out.chosen_input_ids == ids(tokenizer, prompt + " Mix flour, water and yeast.<|im_end|>")
    assert out.rejected_input_ids == ids(tokenizer, prompt + " I won't help.<|im_end|>")
    assert out.prompt_len == len(ids(tokenizer, prompt))


def test_conversational_explicit(tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    out = tokenize_row(row, tokenizer, 1024)
    prompt_text = SYSTEM + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert out.chosen_input_ids == ids(tokenizer, prompt_text + "4<|im_end|>\n")
    assert out.rejected_input_ids == ids(tokenizer, prompt_text + "5<|im_end|>\n")
    assert out.chosen_completion_start == len(ids(tokenizer, prompt_text))


def test_conversational_implicit(tokenizer):
    user = {"role": "user", "content": "Name a colour."}
    row = {
        "chosen": [user, {"role": "assistant", "content": "Blue."}],
        "rejected": [user, {"role": "assistant", "content": "Seven."}],
    }
    out = tokenize_row(row, tokenizer, 1024)
    prompt_text = SYSTEM + "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert out.chosen_input_ids == ids(tokenizer, prompt_text + "Blue.<|im_end|>\n")
    assert out.rejected_completion_start == len(ids(tokenizer, prompt_text))


def test_conversational_system_and_chat_template_kwargs(tokenizer):
    row = {
        "prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
        "chat_template_kwargs": {"unused_flag": True},
    }
    out = tokenize_row(row, tokenizer, 1024)
    text = "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert out.chosen_input_ids == ids(tokenizer, text + "Hello.<|im_end|>\n")


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_modes(tokenizer, mode):
    prompt, chosen, rejected = "one two three four five", " six seven eight nine", " ten"
    full_c = ids(tokenizer, prompt + chosen + "<|im_end|>")
    full_r = ids(tokenizer, prompt + rejected + "<|im_end|>")
    p = len(ids(tokenizer, prompt))
    out = tokenize_row({"prompt": prompt, "chosen": chosen, "rejected": rejected}, tokenizer, 7, mode)
    if mode == "keep_start":
        assert out.chosen_input_ids == full_c[:7]
        assert out.chosen_completion_start == p
        assert out.rejected_input_ids == full_r[:7]
    else:
        assert out.chosen_input_ids == full_c[-7:]
        assert out.chosen_completion_start == max(0, p - (len(full_c) - 7))
        assert out.rejected_input_ids == full_r[-7:]
        assert out.rejected_completion_start == p - (len(full_r) - 7)
    assert out.truncated


def test_truncate_helper_hand_worked():
    assert truncate([1, 2, 3, 4, 5], 2, 3, "keep_start") == ([1, 2, 3], 2)
    assert truncate([1, 2, 3, 4, 5], 2, 3, "keep_end") == ([3, 4, 5], 0)
    assert truncate([1, 2, 3, 4, 5], 4, 3, "keep_end") == ([3, 4, 5], 2)
    assert truncate([1, 2], 1, None, "keep_start") == ([1, 2], 1)


def test_drops(tokenizer):
    long_prompt = "word " * 50
    assert tokenize_row({"prompt": long_prompt, "chosen": " a", "rejected": " b"}, tokenizer, 10) == Drop(
        PROMPT_TOO_LONG
    )
    # keep_end keeps the end of the completion, so nothing is dropped (TRL rule)
    assert not isinstance(
        tokenize_row({"prompt": long_prompt, "chosen": " a", "rejected": " b"}, tokenizer, 10, "keep_end"), Drop
    )
    assert tokenize_row({"prompt": "q", "chosen": " a", "rejected": " a"}, tokenizer, 10) == Drop(IDENTICAL_COMPLETIONS)
    assert tokenize_row({"prompt": "q", "chosen": "", "rejected": " a"}, tokenizer, 10) == Drop(EMPTY_COMPLETION)


def test_extract_prompt_matches_trl():
    from trl.data_utils import extract_prompt as trl_extract

    cases = [
        ("Q: x A: yes", "Q: x A: no"),
        ("abc", "abd"),
        ("same start", "same start and more"),
        ("\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: hi\n\nAssistant: b"),
    ]
    for chosen, rejected in cases:
        expected = trl_extract({"chosen": chosen, "rejected": rejected})
        assert extract_prompt(chosen, rejected) == (expected["prompt"], expected["chosen"], expected["rejected"])
    # documented difference: a first-character mismatch gives an empty prompt (TRL inspects chosen[-1])
    assert extract_prompt("yes ", "no") == ("", "yes ", "no")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "rejected": "b"}, "missing column 'chosen'"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' must be a string or a list of messages, got int"),
        ({"prompt": "q", "chosen": None, "rejected": "b"}, "'chosen' is null"),
        (
            {"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]},
            "mixes standard text and message lists",
        ),
        (
            {
                "prompt": [{"role": "user"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "'prompt' message 0 needs both 'role' and 'content'",
        ),
        (
            {
                "prompt": [{"role": "user", "content": 5}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "content must be a string",
        ),
        (
            {
                "prompt": [{"role": "wizard", "content": "x"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "has role 'wizard'",
        ),
        (
            {
                "prompt": ["hi"],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "must be an object with role and content",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "x"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
                "tools": "{not json",
            },
            "'tools' is a string but not",
        ),
    ],
)
def test_row_errors(tokenizer, row, message):
    with pytest.raises(RowError, match=None) as e:
        tokenize_row(row, tokenizer, 64)
    assert message in str(e.value)


def test_parse_record_errors():
    with pytest.raises(RowError, match="broken JSON"):
        parse_record('{"chosen": "a",')
    with pytest.raises(RowError, match="expected a JSON object"):
        parse_record("[1, 2]")


def test_pair_id_is_a_stable_content_hash():
    row = {"prompt": "q", "chosen": "a", "rejected": "b"}
    assert pair_id(row) == pair_id(json.loads(json.dumps(row)))
    assert pair_id(row) != pair_id({**row, "rejected": "c"})
    assert len(pair_id(row)) == 32
