"""What a run shows: experiment loggers during training, report.md and its plots afterwards.

- `loggers`: metrics.jsonl, TensorBoard, MLflow, W&B.
- `run_report`, `generation_report`, `plots`: report.md, its stage-4 section and PNG plots.

May use: `pipeline.rundir`, `pipeline.data`, `pipeline.models`, `pipeline.cache`, `pipeline.core` and the
top-level modules.
"""
