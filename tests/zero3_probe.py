"""One rank of a ZeRO-3 group without Ray or an engine, for tests/test_zero3_sharding.py: builds the policy the way
stage 3's workers do (`sharded_building`, `build_policy`), reports what this rank holds of each parameter, then
exports it (`export_model`, shards of <= 1 MB). Prints one JSON line.

    python tests/zero3_probe.py RANK WORLD PORT CONFIG_JSON OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(rank: int, world: int, port: str, config_json: str, out: str) -> None:
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world}
    os.environ.update({k: str(v) for k, v in env.items()} | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
    from pipeline.config import config_from_dict
    from pipeline.models.loading import load_tokenizer
    from pipeline.train.engine import build_policy, init_deepspeed_comm, sharded_building
    from pipeline.train.export import export_model

    init_deepspeed_comm(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = config_from_dict(json.loads(Path(config_json).read_text()))
    with sharded_building(cfg, world):
        policy, _ = build_policy(cfg, cfg.model.model)
    held = {
        name: {
            "local": p.numel(),
            "whole": int(getattr(p, "ds_numel", p.numel())),
            "partition": p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel(),
        }
        for name, p in policy.named_parameters()
    }
    export_model(policy, load_tokenizer(cfg.model.model), Path(out), rank, cfg.model.use_peft, shard_bytes=2**20)
    print(json.dumps({"rank": rank, "held": held}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6])
