"""Training (stage 3's workers): the policy under DeepSpeed, one micro-batch, the optimizer, resuming.

- `engine`: build the policy (full or LoRA, partitioned from the start under ZeRO-3) and its DeepSpeed engine.
- `export`: the final model as HF safetensors shards, gathered and written one tensor at a time.
- `step`: one micro-batch (forward, combined loss, metrics row) and the evaluator.
- `optim`: optimizer and learning-rate schedule from the config.
- `collectives`: all-reduce of metric rows on the engine's device.
- `train_state`, `resume`: what a checkpoint holds, and the settings check before resuming from it.
- `checkpoint_files`: the part of a checkpoint one rank reads back (its own partitions, not every rank's).
- `faults`: fault injection for the fault-tolerance tests.

May use: `pipeline.report` (metric loggers), `pipeline.rundir`, `pipeline.data`, `pipeline.models`,
`pipeline.cache`, `pipeline.core` and the top-level modules.
"""
