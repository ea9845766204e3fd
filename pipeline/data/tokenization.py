"""Preference rows -> token ids, with TRL 1.16 DPOTrainer semantics.

Per row (TRL's `_prepare_dataset` + `DataCollatorForPreference`):
1. implicit prompt (no `prompt` key): the prompt is the longest common prefix of chosen and rejected
   (TRL's `extract_prompt`: characters for text, whole messages for conversations);
2. standard text: EOS is appended to each completion that does not already end with it;
3. tokenize prompt, prompt+chosen, prompt+rejected (chat template for conversations, the prompt with
   `add_generation_prompt=True`, `tools` and `chat_template_kwargs` passed through);
4. the completion starts where the tokenized prompt and prompt+completion diverge;
5. each prompt+completion sequence is truncated to max_length (keep_start cuts the end, keep_end the
   start); with keep_start, pairs whose prompt alone fills max_length are dropped.

Problems are either a `RowError` (the data is malformed: the run stops and names file and row) or a
`Drop` with a reason that is counted in the data report.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

TOKENIZATION_VERSION = 1

# Drop reasons (counted in data_report.json); everything else malformed is a RowError.
PROMPT_TOO_LONG = "prompt_too_long"
IDENTICAL_COMPLETIONS = "identical_completions"
EMPTY_COMPLETION = "empty_completion"
DUPLICATE_PAIR = "duplicate_pair"

ROLES = ("system", "user", "assistant", "tool", "developer")


class RowError(ValueError):
    """The row is malformed; the message says what is wrong (the caller adds file and row)."""


@dataclass(frozen=True)
class Drop:
    reason: str


@dataclass(frozen=True)
class TokenizedPair:
    pair_id: str
    chosen_input_ids: list[int]
    rejected_input_ids: list[int]
    chosen_completion_start: int
    rejected_completion_start: int
    prompt_len: int
    truncated: bool
    prompt_merged: bool  # the tokenized prompt was not a prefix of prompt+completion (TRL warns)


def parse_record(record: str) -> dict[str, Any]:
    try:
        value = json.loads(record)
    except json.JSONDecodeError as e:
        raise RowError(f"broken JSON at column {e.colno}: {e.msg}") from None
    if not isinstance(value, dict):
        raise RowError(f"expected a JSON object with chosen/rejected, got {type(value).__name__}")
    return value


def row_format(row: dict[str, Any]) -> str:
    """'conversational' or 'standard'; raises RowError for missing or mistyped columns."""
    for key in ("chosen", "rejected"):
        if key not in row:
            present = ", ".join(sorted(row)) or "none"
            raise RowError(f"missing column '{key}' (columns present: {present})")
    kinds = {}
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            continue
        value = row[key]
        if value is None:
            raise RowError(f"'{key}' is null")
        if isinstance(value, str):
            kinds[key] = "standard"
        elif isinstance(value, list):
            kinds[key] = "conversational"
        else:
            raise RowError(f"'{key}' must be a string or a list of messages, got {type(value).__name__}")
    if len(set(kinds.values())) > 1:
        detail = ", ".join(f"{k} is {v}" for k, v in kinds.items())
        raise RowError(f"mixes standard text and message lists ({detail})")
    return next(iter(kinds.values()))


def _check_messages(key: str, messages: list[Any]) -> None:
    for i, m in enumerate(messages):
        where = f"'{key}' message {i}"
        if not isinstance(m, dict):
            raise RowError(f"{where} must be an object with role and content, got {type(m).__name__}")
        if "role" not in m or "content" not in m:
            raise RowError(f"{where} needs both 'role' and 'content' (has: {', '.join(sorted(m)) or 'nothing'})")
        if m["role"] not in ROLES:
            raise RowError(f"{where} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise RowError(f"{where} content must be a string, got {type(m['content']).__name__}")


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """TRL's extract_prompt: the longest common prefix of chosen and rejected, without a trailing space.

    Differs from TRL in one edge case: when the very first element differs, TRL looks at `chosen[-1]`
    (index -1) and can move the split; here the prompt is simply empty.
    """
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx > 0 and chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def pair_id(row: dict[str, Any]) -> str:
    """A stable content hash of everything that defines the pair."""
    content = {k: row.get(k) for k in ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs")}
    digest = hashlib.blake2b(json.dumps(content, sort_keys=True, ensure_ascii=False).encode(), digest_size=16)
    return digest.hexdigest()


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def truncate(ids: list[int], completion_start: int, max_length: int | None, mode: str) -> tuple[list[int], int]:
    """Truncate one prompt+completion sequence; return it and where its completion now starts."""
    if max_length is None or len(ids) <= max_length:
        return ids, completion_start
    if mode == "keep_start":
        return ids[:max_length], min(completion_start, max_length)
    cut = len(ids) - max_length
    return ids[cut:], max(0, completion_start - cut)


def _chat_kwargs(row: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise RowError(f"'tools' is a string but not valid JSON: {e.msg}") from None
    if tools is not None:
        if not isinstance(tools, list):
            raise RowError(f"'tools' must be a list of tool definitions, got {type(tools).__name__}")
        kwargs["tools"] = tools
    extra = row.get("chat_template_kwargs")
    if extra is not None:
        if not isinstance(extra, dict):
            raise RowError(f"'chat_template_kwargs' must be an object, got {type(extra).__name__}")
        kwargs.update(extra)
    return kwargs


def _template_ids(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    except Exception as e:  # jinja raises its own error types for templates that reject a conversation
        raise RowError(f"the chat template rejected this conversation: {e}") from None
    return list(out["input_ids"])


def tokenize_row(
    row: dict[str, Any], tokenizer: Any, max_length: int | None, truncation_mode: str = "keep_start"
) -> TokenizedPair | Drop:
    """One parsed row -> a TokenizedPair, a Drop, or RowError."""
    fmt = row_format(row)
    pid = pair_id(row)
    chosen, rejected = row["chosen"], row["rejected"]
    if fmt == "conversational":
        for key in ("prompt", "chosen", "rejected"):
            if key in row:
                _check_messages(key, row[key])
    if chosen == rejected:
        return Drop(IDENTICAL_COMPLETIONS)
    prompt = row.get("prompt")
    if prompt is None:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if len(chosen) == 0 or len(rejected) == 0:
        return Drop(EMPTY_COMPLETION)

    if fmt == "conversational":
        if tokenizer.chat_template is None:
            raise RowError("conversational row, but the tokenizer has no chat template")
        kwargs = _chat_kwargs(row)
        prompt_ids = _template_ids(tokenizer, prompt, add_generation_prompt=True, **kwargs)
        chosen_full = _template_ids(tokenizer, prompt + chosen, **kwargs)
        rejected_full = _template_ids(tokenizer, prompt + rejected, **kwargs)
    else:
        eos = tokenizer.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = list(tokenizer(text=prompt)["input_ids"])
        chosen_full = list(tokenizer(text=prompt + chosen)["input_ids"])
        rejected_full = list(tokenizer(text=prompt + rejected)["input_ids"])

    prompt_len = min(common_prefix_length(prompt_ids, chosen_full), common_prefix_length(prompt_ids, rejected_full))
    if max_length is not None and truncation_mode == "keep_start" and prompt_len >= max_length:
        return Drop(PROMPT_TOO_LONG)
    chosen_ids, chosen_start = truncate(chosen_full, prompt_len, max_length, truncation_mode)
    rejected_ids, rejected_start = truncate(rejected_full, prompt_len, max_length, truncation_mode)
    return TokenizedPair(
        pair_id=pid,
        chosen_input_ids=chosen_ids,
        rejected_input_ids=rejected_ids,
        chosen_completion_start=chosen_start,
        rejected_completion_start=rejected_start,
        prompt_len=prompt_len,
        truncated=len(chosen_ids) < len(chosen_full) or len(rejected_ids) < len(rejected_full),
        prompt_merged=prompt_len < len(prompt_ids),
    )
