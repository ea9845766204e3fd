"""Completions of prompts by a causal LM: one greedy completion per prompt, and optionally sampled ones.

    out = generate(model, prompts, pad_id, eos_id, GenerationSettings(max_new_tokens=32))
    out[i][0]          # prompt i's greedy completion, token ids without the prompt and without EOS
    out[i][1:]         # its num_generations sampled completions

Prompts are left-padded into one batch (the attention mask hides the padding, positions start after it), so
a batch gives the tokens each prompt would get alone, up to float rounding in near-ties. A completion stops at
the first EOS or after `max_new_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    num_generations: int = 0  # sampled completions per prompt, besides the greedy one
    temperature: float = 1.0
    top_p: float = 1.0


def generate(
    model: Any, prompts: list[list[int]], pad_id: int, eos_id: int, settings: GenerationSettings, seed: int = 0
) -> list[list[list[int]]]:
    """Per prompt: [greedy, *samples], each the new token ids before EOS. `seed` seeds the sampling."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    common = {"max_new_tokens": settings.max_new_tokens, "pad_token_id": pad_id, "eos_token_id": eos_id}
    with torch.inference_mode():
        greedy = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **common)
        out = [[_completion(row[width:], eos_id)] for row in greedy.tolist()]
        if settings.num_generations:
            torch.manual_seed(seed)
            sampled = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=0,
                num_return_sequences=settings.num_generations,
                **common,
            )
            for i, row in enumerate(sampled.tolist()):
                out[i // settings.num_generations].append(_completion(row[width:], eos_id))
    return out


def _completion(new_tokens: list[int], eos_id: int) -> list[int]:
    """The generated ids up to (not including) the first EOS; generate pads finished rows after it."""
    return new_tokens[: new_tokens.index(eos_id)] if eos_id in new_tokens else new_tokens
