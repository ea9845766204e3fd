"""The cache entries the stages hand each other, their keys, and how a stage finds one.

    tokenized = find_tokenized(cfg, cfg.data.dataset)    # stage 1's output, or CacheError saying how to make it
    reference = find_reference(cfg, tokenized)           # stage 2's output for those pairs

A key hashes everything that changes an entry's content and nothing else: for tokenized pairs the input
files, the tokenizer, max_length, truncation and the tokenization version; for reference scores the
tokenized entry, the reference weights, the dtype and the log-prob convention. No training setting (beta,
loss_type, ...) is in either, so a sweep reuses both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache import manifests
from pipeline.cache.storage import Location, rmtree, write_json_atomic
from pipeline.config import Config
from pipeline.data.sources import InputFile, expand_inputs, fingerprint_inputs
from pipeline.data.tokenization import TOKENIZATION_VERSION
from pipeline.errors import CacheError
from pipeline.models.loading import model_tokenizer_fingerprint, resolve_model, weights_fingerprint

TOKENIZED = "tokenized"
REFERENCE = "reference"
TABLE = "table"
GENERATIONS = "generations"  # stage 4: the reference's completions of eval prompts
PLAN = "plan.json"  # an unfinished reference entry: its key and shard count, for resuming
LOGPROB_VERSION = 1  # bump when the shift/mask/dtype rules of pipeline.core.logprobs change


class TokenizedData(manifests.CacheEntry):
    """A valid stage-1 cache entry: tokenized pairs sorted by pair_id."""

    @property
    def report(self) -> dict[str, Any]:
        return dict(self.manifest["report"])


class ReferenceScores(manifests.CacheEntry):
    """A valid stage-2 cache entry: reference log-probs per pair, in shards of pair_id ranges."""


class TableEntry(manifests.CacheEntry):
    """A valid training table (pipeline.data.table): one Arrow IPC file of pairs and their reference scores."""


# --- the reference entry's layout ---


def shard_of(pair_ids: Sequence[str], num_shards: int) -> np.ndarray:
    """Range-partition the pair_id hash space. Stage 1 writes pairs sorted by pair_id, so each shard is a
    contiguous run of the input and shards complete one after another (a modulo would spread every shard
    over the whole input, so none would be complete before the last block)."""
    return np.array([int(p[:8], 16) * num_shards >> 32 for p in pair_ids], dtype=np.int64)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


# --- keys ---


def tokenized_key(cfg: Config, specs: tuple[str, ...]) -> tuple[str, list[InputFile], str, dict[str, Any]]:
    """(key, input files, resolved model directory, the key's parts): everything that changes the token ids."""
    model_dir = resolve_model(cfg.model.model, cfg.data.cache_dir)
    tokenizer = model_tokenizer_fingerprint(model_dir, cfg.model.trust_remote_code)
    files = expand_inputs(specs, cfg.data.cache_dir)
    parts = {
        "inputs": fingerprint_inputs(files, cfg.data.cache_dir),
        "tokenizer": tokenizer,
        "max_length": cfg.data.max_length,
        "truncation_mode": cfg.data.truncation_mode,
        "version": TOKENIZATION_VERSION,
    }
    return manifests.cache_key(**parts), files, model_dir, parts


def reference_key(cfg: Config, tokenized: TokenizedData) -> tuple[str, str, dict[str, Any]]:
    """(key, resolved reference directory, the key's parts): everything that changes a reference score, and
    nothing a training setting touches."""
    model_dir = resolve_model(cfg.ref_model_name, cfg.data.cache_dir)
    parts = {
        "tokenized": tokenized.key,  # covers tokenizer, data, max_length, truncation
        "ref_weights": weights_fingerprint(model_dir, cfg.data.cache_dir),
        "dtype": cfg.compute_dtype,
        "logprob_version": LOGPROB_VERSION,
    }
    return manifests.cache_key(**parts), model_dir, parts


# --- lookups ---


def find_tokenized(cfg: Config, specs: tuple[str, ...], verify: bool = False) -> TokenizedData:
    """The valid entry for these inputs and settings, or CacheError saying how to produce it. `verify`: also
    recompute its checksums (`manifests.read_valid_manifest`)."""
    key, _, _, _ = tokenized_key(cfg, specs)
    path = manifests.entry_dir(cfg.data.cache_dir, TOKENIZED, key)
    hint = f"Produce it with `dpo-pipeline tokenize` (or `dpo-pipeline run`) for dataset {list(specs)}."
    return TokenizedData(path, key, manifests.read_valid_manifest(path, key, hint, verify))


def find_reference(cfg: Config, tokenized: TokenizedData, verify: bool = False) -> ReferenceScores:
    """The valid reference scores of `tokenized`, or CacheError saying how to produce them."""
    key, _, _ = reference_key(cfg, tokenized)
    path = manifests.entry_dir(cfg.data.cache_dir, REFERENCE, key)
    hint = (
        f"Produce it with `dpo-pipeline score-ref` (or `dpo-pipeline run`) for reference model "
        f"{cfg.ref_model_name} and dtype {cfg.compute_dtype}."
    )
    return ReferenceScores(path, key, manifests.read_valid_manifest(path, key, hint, verify))


def reusable(
    path: Location, key: str, label: str, what: str, resumable: bool = False, verify: bool = False
) -> dict[str, Any] | None:
    """The manifest of a finished entry at `path`, announced as reused; None when there is nothing to reuse.

    Called while this job holds the entry's claim (`claims.found_or_claimed` looks without it only where a
    manifest is), so a directory without a manifest was left by a builder that stopped: a stage that can resume
    it (`resumable`) does, any other clears it and builds it again (no reader uses an entry without manifest)."""
    if not path.exists():
        return None
    if not (path / manifests.MANIFEST).exists():
        if not resumable:
            print(f"{label}: clearing {path}, left unfinished by a job that stopped; building it again", flush=True)
            rmtree(path)
        return None
    manifest = manifests.read_valid_manifest(path, key, "Rerun with --force to rebuild it.", verify)
    print(f"{label}: reusing cached {what} {path} ({manifest['rows']} pairs); nothing rewritten", flush=True)
    return manifest


def check_plan_and_done(path: Location, key: str, num_shards: int, expected: np.ndarray) -> set[int]:
    """Start or resume an unfinished entry; complete shards are kept only if their row counts match."""
    plan = {"key": key, "num_shards": num_shards}
    if not (path / PLAN).exists():
        if path.exists() and any(path.iterdir()):
            raise CacheError(
                f"cache entry {path} holds files but no {PLAN} or manifest: it was not written by this "
                "version. Delete it or rerun with --force."
            )
        write_json_atomic(path / PLAN, plan)
        return set()
    found = json.loads((path / PLAN).read_text())
    if found != plan:
        raise CacheError(
            f"unfinished cache entry {path} was planned as {found}, now {plan}; delete it or rerun with --force."
        )
    done = set()
    for i in range(num_shards):
        f = path / shard_name(i)
        if f.exists():
            try:
                with f.open("rb") as fh:
                    rows = pq.ParquetFile(fh).metadata.num_rows
            except (OSError, pa.ArrowException) as e:
                raise CacheError(
                    f"cache entry {path}: {f.name} is unreadable ({e}); delete the entry or rerun with --force."
                ) from None
            if rows != expected[i]:
                raise CacheError(
                    f"cache entry {path}: {f.name} has {rows} rows, expected {expected[i]}; delete "
                    "the entry or rerun with --force."
                )
            done.add(i)
    return done
