"""dpo-pipeline: Direct Preference Optimization as three Ray stages joined by Parquet.

    dpo-pipeline run --config configs/demo.yaml

Stage 1 tokenizes preference pairs, stage 2 scores them once with the frozen reference model into a
content-addressed cache, stage 3 trains the policy alone against the cached scores.
"""

__version__ = "0.1.0"
