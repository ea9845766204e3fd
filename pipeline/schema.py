"""Column names and Arrow types of the Parquet files that join the stages; defined here once.

A tokenized pair holds two full sequences (prompt + completion, already truncated to max_length), each
with the index where its completion starts. With keep_end truncation the two prompts can be cut
differently, so the sequences are stored whole rather than as a shared prompt plus two completions.
"""

from __future__ import annotations

import pyarrow as pa

PAIR_ID = "pair_id"

# --- stage 1: tokenized pairs ---
CHOSEN_INPUT_IDS = "chosen_input_ids"
REJECTED_INPUT_IDS = "rejected_input_ids"
CHOSEN_COMPLETION_START = "chosen_completion_start"
REJECTED_COMPLETION_START = "rejected_completion_start"
PROMPT_LEN = "prompt_len"  # prompt tokens before truncation
TRUNCATED = "truncated"  # either sequence lost tokens to max_length

TOKENIZED_SCHEMA = pa.schema(
    [
        (PAIR_ID, pa.string()),
        (CHOSEN_INPUT_IDS, pa.list_(pa.int32())),
        (REJECTED_INPUT_IDS, pa.list_(pa.int32())),
        (CHOSEN_COMPLETION_START, pa.int32()),
        (REJECTED_COMPLETION_START, pa.int32()),
        (PROMPT_LEN, pa.int32()),
        (TRUNCATED, pa.bool_()),
    ]
)

# --- stage 2: reference scores (sums over completion tokens, float64 on disk) ---
REF_CHOSEN_LOGPS = "ref_chosen_logps"
REF_REJECTED_LOGPS = "ref_rejected_logps"
CHOSEN_TOKENS = "chosen_tokens"  # completion tokens scored
REJECTED_TOKENS = "rejected_tokens"
# LD-DPO split: sum over the first min(chosen_tokens, rejected_tokens) completion tokens, and the rest.
REF_CHOSEN_SHARED_LOGPS = "ref_chosen_shared_logps"
REF_CHOSEN_TAIL_LOGPS = "ref_chosen_tail_logps"
REF_REJECTED_SHARED_LOGPS = "ref_rejected_shared_logps"
REF_REJECTED_TAIL_LOGPS = "ref_rejected_tail_logps"

REFERENCE_SCHEMA = pa.schema(
    [
        (PAIR_ID, pa.string()),
        (REF_CHOSEN_LOGPS, pa.float64()),
        (REF_REJECTED_LOGPS, pa.float64()),
        (CHOSEN_TOKENS, pa.int32()),
        (REJECTED_TOKENS, pa.int32()),
        (REF_CHOSEN_SHARED_LOGPS, pa.float64()),
        (REF_CHOSEN_TAIL_LOGPS, pa.float64()),
        (REF_REJECTED_SHARED_LOGPS, pa.float64()),
        (REF_REJECTED_TAIL_LOGPS, pa.float64()),
    ]
)

# --- stage 3's input: the training table, an uncompressed Arrow IPC file that workers memory-map ---
CHOSEN_LEN = "chosen_len"  # sequence lengths, for token-budget schedules (no list column scan needed)
REJECTED_LEN = "rejected_len"

TABLE_SCHEMA = pa.schema(
    [
        (PAIR_ID, pa.string()),
        (CHOSEN_INPUT_IDS, pa.list_(pa.int32())),
        (REJECTED_INPUT_IDS, pa.list_(pa.int32())),
        (CHOSEN_COMPLETION_START, pa.int32()),
        (REJECTED_COMPLETION_START, pa.int32()),
        (CHOSEN_LEN, pa.int32()),
        (REJECTED_LEN, pa.int32()),
        (REF_CHOSEN_SHARED_LOGPS, pa.float64()),
        (REF_CHOSEN_TAIL_LOGPS, pa.float64()),
        (REF_REJECTED_SHARED_LOGPS, pa.float64()),
        (REF_REJECTED_TAIL_LOGPS, pa.float64()),
    ]
)
