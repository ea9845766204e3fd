"""The preference data: inputs, tokenization, the cache entries the stages hand each other, the training table.

- `sources`, `demo_data`: input files (jsonl, Parquet, save_to_disk) and the builtin questions.
- `tokenization`: prompt/chosen/rejected rows to token sequences, with drop reasons.
- `entries`: the tokenized, reference and table entries, their keys and lookups (stage 1 -> 2 -> 3).
- `reference_build`: a reference entry while stage 2 scores it: shards written as they complete, manifest last.
- `merge`, `table`, `pairs`: the training table (merged in pair_id order, memory-mapped), its rows, the schedule.

May use: `pipeline.models`, `pipeline.cache`, `pipeline.core` and the top-level modules below them
(`config`, `schema`, `errors`).
"""
