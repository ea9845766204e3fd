"""Stage 4: the held-out prompts answered by the reference (before) and by the trained policy (after).

    dpo-pipeline generate --config configs/demo.yaml    # after `train`; `run` does it when eval data is set

Each eval prompt gets a greedy completion (and `num_generations` sampled ones) from a Ray Data actor pool,
like stage 2's (GPUs with use_gpu). "Before" is the reference (for reference-free losses, which load none,
the policy's starting weights); its completions are a cache entry keyed by the tokenized eval data, its
weights, the dtype and the generation settings, so a sweep generates them once. The policy's are new on
every run. Both go to `generations.jsonl` in the run directory, scored by the task's own checker where the
prompt is a builtin question (`pipeline.evaluate.answers`) and by the judge when one is configured; the totals go to
`generation_summary.json` and the report.
"""

from __future__ import annotations

import json
import time
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline import schema
from pipeline.cache import manifests, storage
from pipeline.cache.claims import found_or_claimed
from pipeline.cache.storage import location, write_json_atomic
from pipeline.cluster import SetupErrorsOnFirstCall, cpus_each, data_context
from pipeline.config import Config, ModelConfig
from pipeline.data.entries import GENERATIONS, TokenizedData, find_tokenized, reusable
from pipeline.errors import PipelineError
from pipeline.evaluate.completions import add_judge_scores, completion_records, summarize
from pipeline.evaluate.generation import GenerationSettings
from pipeline.evaluate.judge import load_judge
from pipeline.models.loading import resolve_model, weights_fingerprint
from pipeline.progress import Progress
from pipeline.rundir import FINAL, GENERATION_SUMMARY, GENERATIONS_FILE
from pipeline.uris import is_uri

FILE = "generations.parquet"
COMPLETIONS = "completions"  # list<list<int32>>: [greedy, *samples] per pair
GENERATION_VERSION = 1
OUT_SCHEMA = pa.schema([(schema.PAIR_ID, pa.string()), (COMPLETIONS, pa.list_(pa.list_(pa.int32())))])


class _Generate(SetupErrorsOnFirstCall):
    def setup(
        self, model_dir: str, model_cfg: ModelConfig, dtype: str, threads: int, gpus: int, settings: GenerationSettings
    ) -> None:
        import torch

        from pipeline.models.loading import load_causal_lm, load_tokenizer
        from pipeline.models.placement import gpu_placement

        torch.set_num_threads(threads)
        self.model = load_causal_lm(
            model_dir,
            dtype,
            model_cfg.trust_remote_code,
            model_cfg.allow_pickle_weights,
            placement=gpu_placement(gpus) if gpus else None,
        )
        tokenizer = load_tokenizer(model_dir, model_cfg.trust_remote_code)
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.settings = settings

    def process(self, batch: pa.Table) -> pa.Table:
        from pipeline.evaluate.generation import generate

        ids = batch.column(schema.PAIR_ID).to_pylist()
        prompts = batch.column("prompt_ids").to_pylist()
        seed = int.from_bytes(ids[0].encode()[:8].ljust(8, b"\0"), "little") if ids else 0  # per batch, reproducible
        completions = generate(self.model, prompts, self.pad_id, self.eos_id, self.settings, seed)
        return pa.table({schema.PAIR_ID: ids, COMPLETIONS: completions}, schema=OUT_SCHEMA)


def _read_prompts(batch: dict[str, Any]) -> pa.Table:
    """pair_id and prompt token ids (the chosen sequence up to its completion) of one tokenized file."""
    table = pa.concat_tables([pq.read_table(p) for p in batch["path"]])
    starts = table.column(schema.CHOSEN_COMPLETION_START).to_pylist()
    prompts = [ids[:s] for ids, s in zip(table.column(schema.CHOSEN_INPUT_IDS).to_pylist(), starts, strict=True)]
    return pa.table({schema.PAIR_ID: table.column(schema.PAIR_ID), "prompt_ids": prompts})


# --- the stage ---


def before_model(cfg: Config) -> str:
    """The model whose answers are "before": the reference, or for reference-free losses (which load no
    reference) the policy's starting weights."""
    return cfg.ref_model_name if cfg.loss.needs_reference else cfg.model.model


def settings_of(cfg: Config) -> GenerationSettings:
    g = cfg.generate
    return GenerationSettings(g.max_new_tokens, g.num_generations, g.temperature, g.top_p)


def run_generate(cfg: Config, verify: bool = False) -> dict[str, Any]:
    """Reference and policy completions of every eval prompt, written to the run directory; the summary."""
    if not cfg.data.eval_dataset:
        raise PipelineError("generate answers the eval prompts: set eval_dataset")
    if not cfg.generate.max_new_tokens:
        raise PipelineError("max_new_tokens is 0: nothing to generate (set it > 0)")
    judge = load_judge(cfg.generate.judge) if cfg.generate.judge else None  # a bad judge fails before any work
    policy_dir = _policy_dir(cfg)
    tokenized = find_tokenized(cfg, cfg.data.eval_dataset, verify)
    reference = reference_generations(cfg, tokenized, verify)
    start = time.time()
    print(f"[generate] eval: policy {policy_dir}: {tokenized.manifest['rows']} prompts", flush=True)
    policy = _generate(cfg, tokenized, policy_dir, "policy")
    print(f"[generate] eval: policy done in {time.time() - start:.1f}s", flush=True)
    records = completion_records(tokenized, reference, policy, resolve_model(cfg.model.model, cfg.data.cache_dir))
    if judge is not None and cfg.generate.judge:
        add_judge_scores(records, judge, cfg.generate.judge)
    summary = summarize(records)
    out = location(cfg.data.output_dir)
    with storage.atomic_target(out / GENERATIONS_FILE) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_json_atomic(out / GENERATION_SUMMARY, summary)
    print(f"[generate] eval: {len(records)} prompts -> {out / GENERATIONS_FILE}", flush=True)
    return summary


def reference_generations(cfg: Config, tokenized: TokenizedData, verify: bool = False) -> dict[str, list[list[int]]]:
    """The "before" completions per pair_id: a cache entry, generated once per key."""
    model_dir = resolve_model(before_model(cfg), cfg.data.cache_dir)
    parts = {
        "tokenized": tokenized.key,
        "ref_weights": weights_fingerprint(model_dir, cfg.data.cache_dir),
        "dtype": cfg.compute_dtype,
        "settings": settings_of(cfg).__dict__,
        "version": GENERATION_VERSION,
    }
    key = manifests.cache_key(**parts)
    path = manifests.entry_dir(cfg.data.cache_dir, GENERATIONS, key)
    label = "[generate] eval"
    find = partial(reusable, path, key, label, "reference completions", verify=verify)
    with found_or_claimed(path, label, find) as found:  # None: this job generates them, holding the claim
        if found is None:
            _write_reference(cfg, tokenized, model_dir, path, key, parts)
    fs, files = storage.parquet_source([str(path / FILE)])
    table = pq.read_table(files[0], filesystem=fs)
    return dict(zip(table.column(schema.PAIR_ID).to_pylist(), table.column(COMPLETIONS).to_pylist(), strict=True))


def _write_reference(
    cfg: Config, tokenized: TokenizedData, model_dir: str, path: storage.Location, key: str, parts: dict[str, Any]
) -> None:
    start = time.time()
    rows = tokenized.manifest["rows"]
    print(f"[generate] eval: reference {before_model(cfg)}: {rows} prompts -> {path}", flush=True)
    completions = _generate(cfg, tokenized, model_dir, "reference")
    table = pa.table(
        {schema.PAIR_ID: list(completions), COMPLETIONS: list(completions.values())}, schema=OUT_SCHEMA
    ).sort_by(schema.PAIR_ID)
    with storage.atomic_target(path, directory=True) as tmp, (tmp / FILE).open("wb") as fh:
        pq.write_table(table, fh)
    manifests.write_manifest(path, key, GENERATIONS, [FILE], rows=table.num_rows, inputs=parts)
    print(f"[generate] eval: reference done in {time.time() - start:.1f}s", flush=True)


def _generate(cfg: Config, tokenized: TokenizedData, model_dir: str, label: str) -> dict[str, list[list[int]]]:
    """Completions of every prompt of `tokenized` by the model in `model_dir`, on an actor pool."""
    actors = cfg.scale.ref_actors
    cpus = cpus_each(cfg.scale.cpus_per_ref_actor, actors)
    batch = cfg.train.per_device_eval_batch_size
    data_context()
    ds = (  # read and cut before any actor holds a core (stage 2 does the same)
        ray.data.from_items([{"path": f} for f in tokenized.files])
        .map_batches(_read_prompts, batch_size=1)
        .repartition(target_num_rows_per_block=batch)
        .materialize()
    )
    generated = ds.map_batches(
        _Generate,
        fn_constructor_args=(model_dir, cfg.model, cfg.compute_dtype, cpus, cfg.scale.ref_actor_gpus, settings_of(cfg)),
        batch_size=batch,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=cfg.scale.ref_actor_gpus,
    )
    out: dict[str, list[list[int]]] = {}
    progress = Progress(f"[generate] eval: {label}", tokenized.manifest["rows"], "prompts")
    for block in generated.iter_batches(batch_size=None, batch_format="pyarrow"):
        assert isinstance(block, pa.Table)
        progress.add(block.num_rows)
        out.update(zip(block.column(schema.PAIR_ID).to_pylist(), block.column(COMPLETIONS).to_pylist(), strict=True))
    if len(out) != tokenized.manifest["rows"]:
        raise PipelineError(f"generated {len(out)} of {tokenized.manifest['rows']} eval prompts of {tokenized.path}")
    return out


def unsupported(cfg: Config) -> str | None:
    """Why this config cannot generate, or None: the trained policy is read from output_dir's files."""
    if is_uri(cfg.data.output_dir):
        return (
            f"generate reads the trained policy from {cfg.data.output_dir}, a URI: it needs a local or shared "
            "output_dir (object storage is not supported yet)"
        )
    return None


def _policy_dir(cfg: Config) -> str:
    """The trained policy in output_dir: `final/`, or `final/merged/` for LoRA (a full model either way)."""
    final = location(cfg.data.output_dir) / FINAL
    if (why := unsupported(cfg)) is not None:
        raise PipelineError(why)
    merged = final / "merged"
    found = merged if merged.is_dir() else final
    if not (found / "config.json").is_file():
        raise PipelineError(f"no trained policy in {final}: run `dpo-pipeline train` (or `run`) first")
    return str(found)
