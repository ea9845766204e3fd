"""The MLP of every decoder layer run over tiles of the sequence (`tiled_mlp`), for long sequences.

    tile_mlps(model)   # after loading, before DeepSpeed wraps it

A decoder layer's MLP holds (T, intermediate_size) activations, several times its input, while it runs and, in
backward, while its gradient is computed. DeepSpeed's `TiledMLP` (ALST, arXiv:2506.13996) runs it on tiles of
about `hidden_size` positions under no_grad and recomputes each tile in backward, so those activations exist for
one tile at a time. Every position's MLP output is computed alone, so the values do not change; the weight
gradients are summed over the tiles, which changes their float rounding only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pipeline.models.deepspeed_import import import_deepspeed


def tile_mlps(model: torch.nn.Module, agree: Callable[[int], int] = lambda n: n) -> int:
    """Tile every module named `*.mlp` (the decoder layers' feed-forward blocks of Llama-style models); returns
    how many there were. A call runs ceil(T / hidden_size) tiles; under ZeRO-3 each tile gathers the MLP's
    weights, a collective, so `agree` maps this rank's count to the one every rank uses (`agree_max`)."""
    import_deepspeed()
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    hidden = model.config.get_text_config().hidden_size  # type: ignore[union-attr,operator]
    tiled = 0
    for name, module in model.named_modules():
        if not name.endswith(".mlp") or not list(module.parameters()):
            continue
        original = module.forward

        def forward(x: Tensor, _run: Any = original, _module: torch.nn.Module = module) -> Tensor:
            shards = agree(math.ceil(x.size(-2) / hidden))
            if shards <= 1:
                return _run(x)  # type: ignore[no-any-return]
            params = list(_module.parameters())
            return TiledMLP.apply(lambda _self, h: _run(h), _module, x, shards, params)  # type: ignore[no-any-return]

        module.forward = forward
        tiled += 1
    if not tiled:
        from pipeline.errors import ConfigError

        raise ConfigError(f"tiled_mlp=true: {type(model).__name__} has no `*.mlp` modules to tile; set it to false")
    return tiled
