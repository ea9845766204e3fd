"""Stage 2: score the tokenized pairs once with the frozen reference model, on a Ray Data actor pool.

    dpo-pipeline score-ref --config configs/demo.yaml

Each actor holds one copy of the reference model, on `gpus_per_ref_actor` GPUs with use_gpu (split by layers
when it needs more than one; `pipeline.models.placement`). It receives blocks of pairs, sorts each block by
length so that micro-batches of `precompute_ref_batch_size` pairs carry little padding, and runs the
same forward and log-prob function as training, under `torch.inference_mode`.

The output is sharded by pair_id hash under `<cache_dir>/reference/<key>/`. The driver writes a shard
(temp file + rename) as soon as all its pairs are scored, so a crash or kill loses only unfinished
shards and a rerun scores only what is missing. The manifest is written last.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline import schema
from pipeline.cache import manifests, storage
from pipeline.cache.claims import found_or_claimed
from pipeline.cluster import SetupErrorsOnFirstCall, cpus_each, data_context
from pipeline.config import Config, ModelConfig
from pipeline.data import entries
from pipeline.data.entries import (
    REFERENCE,
    ReferenceScores,
    TokenizedData,
    reference_key,
    reusable,
    shard_name,
    shard_of,
)
from pipeline.models.kernels import choose_kernels
from pipeline.progress import Progress

SHARD_PAIRS = 4096
BLOCK_BATCHES = 16  # micro-batches per block that an actor sorts by length


# --- the Ray user function: convert a block, call pipeline/ ---


class _ScoreRef(SetupErrorsOnFirstCall):
    def setup(
        self, model_dir: str, model_cfg: ModelConfig, dtype: str, threads: int, micro_batch: int, gpus: int
    ) -> None:
        import torch

        from pipeline.models.loading import build_model, load_tokenizer

        torch.set_num_threads(threads)
        self.model, kernels = build_model(model_cfg, model_dir, dtype, gpus > 0, gpus)  # read onto its GPUs
        if gpus:
            print(f"[score-ref] kernels: {kernels.describe()}", flush=True)
        self.pad_id = load_tokenizer(model_dir, model_cfg.trust_remote_code).pad_token_id
        self.micro_batch = micro_batch
        self.padding_free = kernels.padding_free

    def process(self, block: pa.Table) -> pa.Table:
        import torch

        from pipeline.models.forward import collate_pairs, sequence_forward

        columns = block.to_pydict()
        lengths = [
            max(len(c), len(r)) for c, r in zip(columns[schema.CHOSEN_INPUT_IDS], columns[schema.REJECTED_INPUT_IDS])
        ]
        order = np.argsort(lengths, kind="stable")
        out: dict[str, list[Any]] = defaultdict(list)
        for start in range(0, len(order), self.micro_batch):
            idx = order[start : start + self.micro_batch]
            sub = {k: [v[i] for i in idx] for k, v in columns.items()}
            batch = collate_pairs(sub, self.pad_id)
            with torch.inference_mode():
                stats = sequence_forward(self.model, batch, padding_free=self.padding_free)
            b = batch.num_pairs
            for name, tensor in (
                ("logps", stats.logps),
                ("tokens", stats.tokens),
                ("shared", stats.shared_logps),
                ("tail", stats.tail_logps),
            ):
                values = tensor.double().cpu().numpy() if name != "tokens" else tensor.cpu().numpy()
                out[f"chosen_{name}"].extend(values[:b])
                out[f"rejected_{name}"].extend(values[b:])
            real = batch.attention_mask.sum(dim=1).cpu().numpy()
            padding = 2 * batch.input_ids.size(1) - (real[:b] + real[b:])
            out["_tokens"].extend(real[:b] + real[b:])
            out["_padded"].extend(np.zeros_like(padding) if self.padding_free else padding)
            out[schema.PAIR_ID].extend(sub[schema.PAIR_ID])
        return pa.table(
            {
                schema.PAIR_ID: out[schema.PAIR_ID],
                schema.REF_CHOSEN_LOGPS: out["chosen_logps"],
                schema.REF_REJECTED_LOGPS: out["rejected_logps"],
                schema.CHOSEN_TOKENS: np.asarray(out["chosen_tokens"], dtype=np.int32),
                schema.REJECTED_TOKENS: np.asarray(out["rejected_tokens"], dtype=np.int32),
                schema.REF_CHOSEN_SHARED_LOGPS: out["chosen_shared"],
                schema.REF_CHOSEN_TAIL_LOGPS: out["chosen_tail"],
                schema.REF_REJECTED_SHARED_LOGPS: out["rejected_shared"],
                schema.REF_REJECTED_TAIL_LOGPS: out["rejected_tail"],
                "_tokens": np.asarray(out["_tokens"], dtype=np.int64),
                "_padded": np.asarray(out["_padded"], dtype=np.int64),
            }
        )


def _read_unscored(batch: dict[str, Any], num_shards: int, wanted: frozenset[int]) -> pa.Table:
    """The pairs of one tokenized file that belong to shards still to be scored."""
    table = pa.concat_tables([pq.read_table(p) for p in batch["path"]])
    shards = shard_of(table.column(schema.PAIR_ID).to_pylist(), num_shards)
    return table.filter(pa.array(np.isin(shards, list(wanted))))


# --- the stage ---


def run_score_ref(
    cfg: Config,
    tokenized: TokenizedData,
    split: str = "train",
    force: bool = False,
    shard_pairs: int = SHARD_PAIRS,
    verify: bool = False,
) -> ReferenceScores:
    key, model_dir, parts = reference_key(cfg, tokenized)
    path = manifests.entry_dir(cfg.data.cache_dir, REFERENCE, key)
    label = f"[score-ref] {split}"
    find = partial(reusable, path, key, label, "reference scores", resumable=True, verify=verify)
    with found_or_claimed(path, label, find, force) as found:  # None: score it, or the shards still missing
        if found is not None:
            return ReferenceScores(path, key, found)
        return _score(cfg, tokenized, model_dir, parts, path, key, split, shard_pairs)


def _score(
    cfg: Config,
    tokenized: TokenizedData,
    model_dir: str,
    parts: dict[str, Any],
    path: storage.Location,
    key: str,
    split: str,
    shard_pairs: int,
) -> ReferenceScores:
    fs, files = storage.parquet_source(tokenized.files)
    pair_ids = pq.ParquetDataset(files, filesystem=fs).read(columns=[schema.PAIR_ID]).column(schema.PAIR_ID).to_pylist()
    num_shards = max(1, math.ceil(len(pair_ids) / shard_pairs))
    expected = np.bincount(shard_of(pair_ids, num_shards), minlength=num_shards)
    done = entries.check_plan_and_done(path, key, num_shards, expected)
    missing = frozenset(i for i in range(num_shards) if i not in done)
    if done:
        print(f"[score-ref] {split}: resuming {path}: {len(done)}/{num_shards} shards already scored", flush=True)
    else:
        print(f"[score-ref] {split}: scoring {len(pair_ids)} pairs with {cfg.ref_model_name} -> {path}", flush=True)

    start = time.time()
    totals = {"tokens": 0, "padded": 0, "pairs": 0}
    if missing:
        _score_missing(cfg, tokenized, model_dir, path, num_shards, missing, expected, totals, split)
    elapsed = time.time() - start
    names = [shard_name(i) for i in range(num_shards)]
    manifest = manifests.write_manifest(
        path,
        key,
        REFERENCE,
        names,
        rows=len(pair_ids),
        inputs=parts,
        reference_model=cfg.ref_model_name,
        split=split,
        shards=num_shards,
        timings={"score_s": round(elapsed, 2), "pairs_scored_now": totals["pairs"]},
        padding_fraction=_padding(totals),
        versions=_versions(),
    )
    (path / entries.PLAN).unlink(missing_ok=True)
    rate = totals["pairs"] / elapsed if elapsed > 0 else 0.0
    print(
        f"[score-ref] {split}: {totals['pairs']} pairs scored in {elapsed:.1f}s ({rate:.1f} pairs/s), padding "
        f"{100 * _padding(totals):.1f}% of batch tokens",
        flush=True,
    )
    return ReferenceScores(path, key, manifest)


def _score_missing(
    cfg: Config,
    tokenized: TokenizedData,
    model_dir: str,
    path: storage.Location,
    num_shards: int,
    missing: frozenset[int],
    expected: np.ndarray,
    totals: dict[str, int],
    split: str,
) -> None:
    if not cfg.scale.use_gpu:  # refuse a kernel choice this machine cannot run before any actor starts
        print(
            f"[score-ref] kernels: {choose_kernels(cfg.model, cuda=False, dtype=cfg.compute_dtype).describe()}",
            flush=True,
        )
    actors = cfg.scale.ref_actors
    cpus = cpus_each(cfg.scale.cpus_per_ref_actor, actors)
    micro = cfg.train.ref_batch_size
    for i in missing:
        if expected[i] == 0:  # no pair falls in it, so no block will ever complete it
            _write_shard(path, i, [schema.REFERENCE_SCHEMA.empty_table()])
    # Read and cut into blocks of one actor call each before any actor holds a core. Fed a whole file as
    # one block, a single actor would score all of it and return it at the end: no spread over the pool,
    # and no shard complete before the file is.
    data_context()
    ds = (
        ray.data.from_items([{"path": f} for f in tokenized.files])
        .map_batches(
            _read_unscored,  # type: ignore[arg-type]  # Ray's stubs do not know fn_kwargs
            fn_kwargs={"num_shards": num_shards, "wanted": missing},
            batch_size=1,
        )
        .repartition(target_num_rows_per_block=micro * BLOCK_BATCHES)
        .materialize()
    )
    scored = ds.map_batches(
        _ScoreRef,
        fn_constructor_args=(model_dir, cfg.model, cfg.compute_dtype, cpus, micro, cfg.scale.ref_actor_gpus),
        batch_size=micro * BLOCK_BATCHES,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=cfg.scale.ref_actor_gpus,
    )
    pending: dict[int, list[pa.Table]] = defaultdict(list)
    have: dict[int, int] = defaultdict(int)
    written = 0
    progress = Progress(f"[score-ref] {split}", int(expected[sorted(missing)].sum()), "pairs")
    for block in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
        progress.add(block.num_rows)
        totals["tokens"] += int(pa.compute.sum(block.column("_tokens")).as_py() or 0)
        totals["padded"] += int(pa.compute.sum(block.column("_padded")).as_py() or 0)
        totals["pairs"] += block.num_rows
        shards = shard_of(block.column(schema.PAIR_ID).to_pylist(), num_shards)
        for i in np.unique(shards):
            part = block.filter(pa.array(shards == i)).select(schema.REFERENCE_SCHEMA.names)
            pending[int(i)].append(part)
            have[int(i)] += part.num_rows
            if have[int(i)] == expected[i]:
                _write_shard(path, int(i), pending.pop(int(i)))
                written += 1
                print(
                    f"[score-ref] {split}: {written}/{len(missing)} shards written, {totals['pairs']} pairs scored",
                    flush=True,
                )


def _write_shard(path: storage.Location, i: int, parts: list[pa.Table]) -> None:
    table = pa.concat_tables(parts).cast(schema.REFERENCE_SCHEMA).sort_by(schema.PAIR_ID)
    with storage.atomic_target(path / shard_name(i)) as tmp, tmp.open("wb") as fh:
        pq.write_table(table, fh)


def _padding(totals: dict[str, int]) -> float:
    batch_tokens = totals["tokens"] + totals["padded"]
    return totals["padded"] / batch_tokens if batch_tokens else 0.0


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "logprob_version": str(entries.LOGPROB_VERSION),
    }
