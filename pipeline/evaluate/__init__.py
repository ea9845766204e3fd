"""Stage 4's pieces: generation settings, answer checkers, the judge hook, the completion records.

- `generation`: greedy and sampled completions of left-padded prompt batches.
- `answers`: one strict checker per builtin task family.
- `judge`: the user's `module:function` judge, loaded and checked.
- `completions`: eval prompts in, records and accuracy summaries out.

May use: `pipeline.data`, `pipeline.models`, `pipeline.cache`, `pipeline.core` and the top-level modules.
"""
