"""Tiny random Llama models for tests and benchmarks, saved like real ones (safetensors + tokenizer).

Tests import this module directly (pytest puts tests/ on sys.path); benchmarks add tests/ to sys.path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def make_tiny_model(
    out: str | os.PathLike,
    tokenizer: Any,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
) -> Path:
    """A random Llama-style model saved with save_pretrained (plus `tokenizer`), so it loads like a real one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
