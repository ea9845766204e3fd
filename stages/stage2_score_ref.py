"""Stage 2: score the tokenized pairs once with the frozen reference model, on a Ray Data actor pool.

    dpo-pipeline score-ref --config configs/demo.yaml

Each actor holds one copy of the reference model, on `gpus_per_ref_actor` GPUs with use_gpu (split by layers
when it needs more than one; `pipeline.models.placement`). It receives blocks of pairs, sorts each block by
length so that micro-batches of `precompute_ref_batch_size` pairs carry little padding, and runs the
same forward and log-prob function as training, under `torch.inference_mode`. The training and eval splits
go through the same pool (`score_splits`): the reference model loads once per run, not once per split.

The output is sharded by pair_id hash under `<cache_dir>/reference/<key>/`. The driver writes a shard
(temp file + rename) as soon as all its pairs are scored, so a crash or kill loses only unfinished
shards and a rerun scores only what is missing. The manifest is written last.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
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
from pipeline.core.batching import pack_by_budget
from pipeline.data.entries import (
    REFERENCE,
    ReferenceScores,
    TokenizedData,
    reference_key,
    reusable,
    shard_of,
)
from pipeline.data.reference_build import ReferenceBuild, label, plan_entry
from pipeline.errors import CacheError
from pipeline.models.kernels import choose_kernels
from pipeline.progress import Progress

SHARD_PAIRS = 4096
SPLIT = "_split"  # which entry a pair is scored for: the index of its split in one pool's work
BLOCK_BATCHES = 16  # micro-batches per block that an actor sorts by length


# --- the Ray user function: convert a block, call pipeline/ ---


class _ScoreRef(SetupErrorsOnFirstCall):
    def setup(
        self,
        model_dir: str,
        model_cfg: ModelConfig,
        dtype: str,
        threads: int,
        micro_batch: int,
        max_tokens: int | None,
        gpus: int,
    ) -> None:
        import torch

        from pipeline.models.loading import build_model, load_tokenizer

        torch.set_num_threads(threads)
        self.model, kernels = build_model(model_cfg, model_dir, dtype, gpus > 0, gpus)  # read onto its GPUs
        if gpus:
            print(f"[score-ref] kernels: {kernels.describe()}", flush=True)
        self.pad_id = load_tokenizer(model_dir, model_cfg.trust_remote_code).pad_token_id
        self.micro_batch = micro_batch
        self.max_tokens = max_tokens
        self.padding_free = kernels.padding_free

    def micro_batches(self, columns: dict[str, list[Any]]) -> list[np.ndarray]:
        """The block's pairs sorted by length, cut into micro-batches of at most `micro_batch` pairs and, with a
        token budget, at most `max_tokens` tokens (`pipeline.core.batching.pack_by_budget`, as training cuts)."""
        lengths = np.array(
            [(len(c), len(r)) for c, r in zip(columns[schema.CHOSEN_INPUT_IDS], columns[schema.REJECTED_INPUT_IDS])]
        ).reshape(-1, 2)
        order = np.argsort(lengths.max(axis=1), kind="stable")
        by_pairs = [order[i : i + self.micro_batch] for i in range(0, len(order), self.micro_batch)]
        if self.max_tokens is None:
            return by_pairs
        padded = not self.padding_free
        return [b for group in by_pairs for b in pack_by_budget(group, lengths, self.max_tokens, padded)]

    def process(self, block: pa.Table) -> pa.Table:
        import torch

        from pipeline.models.forward import collate_pairs, sequence_forward

        columns = block.to_pydict()
        out: dict[str, list[Any]] = defaultdict(list)
        for idx in self.micro_batches(columns):
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
            out[SPLIT].extend(sub[SPLIT])
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
                SPLIT: np.asarray(out[SPLIT], dtype=np.int32),
            }
        )


def _read_unscored(batch: dict[str, Any], plans: dict[int, tuple[int, frozenset[int]]]) -> pa.Table:
    """The pairs of one tokenized file that belong to shards still to be scored, tagged with their split's index
    (`plans`: split index -> (number of shards, shards wanted))."""
    table = pa.concat_tables([pq.read_table(p) for p in batch["path"]])
    (split,) = {int(i) for i in batch["split"]}
    num_shards, wanted = plans[split]
    shards = shard_of(table.column(schema.PAIR_ID).to_pylist(), num_shards)
    table = table.filter(pa.array(np.isin(shards, list(wanted))))
    return table.append_column(SPLIT, pa.array(np.full(table.num_rows, split, dtype=np.int32)))


# --- the stage ---


def run_score_ref(
    cfg: Config,
    tokenized: TokenizedData,
    split: str = "train",
    force: bool = False,
    shard_pairs: int = SHARD_PAIRS,
    verify: bool = False,
) -> ReferenceScores:
    """One split's reference scores (`score_splits` of that split alone)."""
    return score_splits(cfg, {split: tokenized}, force, shard_pairs, verify)[split]


def score_splits(
    cfg: Config,
    tokenized: dict[str, TokenizedData],
    force: bool = False,
    shard_pairs: int = SHARD_PAIRS,
    verify: bool = False,
) -> dict[str, ReferenceScores]:
    """The reference scores of every split: each cached entry reused, the others scored by one actor pool, so
    the reference model loads once for all of them (minutes at 70B).

    This job claims the entries it scores in key order, so two jobs that need some of the same entries never
    wait on each other in a cycle; a split whose entry is another split's (the same data) reuses it after."""
    keys = {split: reference_key(cfg, data) for split, data in tokenized.items()}
    out: dict[str, ReferenceScores] = {}
    with contextlib.ExitStack() as claims:
        todo: list[ReferenceBuild] = []
        claimed: set[str] = set()
        for split in sorted(tokenized, key=lambda s: keys[s][0]):
            key, _, parts = keys[split]
            if key in claimed:
                continue
            claimed.add(key)
            path = manifests.entry_dir(cfg.data.cache_dir, REFERENCE, key)
            find = _finder(path, key, split, verify)
            found = claims.enter_context(found_or_claimed(path, label(split), find, force))
            if found is not None:
                out[split] = ReferenceScores(path, key, found)
            else:
                todo.append(plan_entry(cfg, split, tokenized[split], key, parts, path, shard_pairs))
        if todo:
            todo.sort(key=lambda e: list(tokenized).index(e.split))  # read in the splits' order: train first
            _score_missing(cfg, keys[todo[0].split][1], todo)
            out.update({e.split: e.commit(cfg) for e in todo})
    for split in tokenized:
        if split not in out:  # its entry is another split's, built above
            key = keys[split][0]
            path = manifests.entry_dir(cfg.data.cache_dir, REFERENCE, key)
            found = _finder(path, key, split, verify)()
            if found is None:
                raise CacheError(f"{label(split)}: {path} was scored by this job but has no manifest")
            out[split] = ReferenceScores(path, key, found)
    return {split: out[split] for split in tokenized}


def _finder(path: storage.Location, key: str, split: str, verify: bool) -> Callable[[], dict[str, Any] | None]:
    return partial(reusable, path, key, label(split), "reference scores", resumable=True, verify=verify)


def _score_missing(cfg: Config, model_dir: str, todo: list[ReferenceBuild]) -> None:
    """Score the missing shards of every entry in `todo` on one actor pool; each shard is written as soon as all
    its pairs are in (`elapsed`: from the pool's start to the entry's last shard)."""
    items = [{"path": f, "split": i} for i, e in enumerate(todo) if e.missing for f in e.tokenized.files]
    if not items:  # resumed entries whose every shard was already written: only their manifests are missing
        return
    if not cfg.scale.use_gpu:  # refuse a kernel choice this machine cannot run before any actor starts
        print(
            f"[score-ref] kernels: {choose_kernels(cfg.model, cuda=False, dtype=cfg.compute_dtype).describe()}",
            flush=True,
        )
    actors = cfg.scale.ref_actors
    cpus = cpus_each(cfg.scale.cpus_per_ref_actor, actors)
    micro = cfg.train.ref_batch_size
    # Read and cut into blocks of one actor call each before any actor holds a core. Fed a whole file as
    # one block, a single actor would score all of it and return it at the end: no spread over the pool,
    # and no shard complete before the file is.
    data_context()
    start = time.time()
    ds = (
        ray.data.from_items(items)
        .map_batches(
            _read_unscored,  # type: ignore[arg-type]  # Ray's stubs do not know fn_kwargs
            fn_kwargs={"plans": {i: (len(e.expected), e.missing) for i, e in enumerate(todo)}},
            batch_size=1,
        )
        .repartition(target_num_rows_per_block=micro * BLOCK_BATCHES)
        .materialize()
    )
    scored = ds.map_batches(
        _ScoreRef,
        fn_constructor_args=(
            model_dir,
            cfg.model,
            cfg.compute_dtype,
            cpus,
            micro,
            cfg.train.ref_max_tokens,
            cfg.scale.ref_actor_gpus,
        ),
        batch_size=micro * BLOCK_BATCHES,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=cfg.scale.ref_actor_gpus,
    )
    total = sum(int(e.expected[sorted(e.missing)].sum()) for e in todo)
    progress = Progress(f"[score-ref] {'+'.join(e.split for e in todo)}", total, "pairs")
    for block in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
        progress.add(block.num_rows)
        tags = block.column(SPLIT).to_numpy()
        for i in np.unique(tags):
            todo[int(i)].add(block.filter(pa.array(tags == i)), start)
