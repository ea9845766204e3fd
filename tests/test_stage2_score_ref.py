"""Stage 2 end to end on a real local Ray: scores against an independent per-pair forward, cache reuse and
--force, resuming after a real kill, refusals, what the key covers, LoRA, several actors, and every split on one
pool.

The independent reference, written out here and never calling pipeline.core.logprobs: for one unpadded
sequence x of length L whose completion starts at s, the full model gives logits z (L, V) and

    logp = Σ_{t = max(s, 1)}^{L-1} log_softmax(z[t-1])[x_t]        (float64; position t-1 scores token t)
    shared = the same sum over the first min(n_chosen, n_rejected) of those terms, tail = the rest.

Tolerance: the stage runs the model in float32 and sums ~-11 nats per token in float32 (the tiny model's
49k-token vocabulary is nearly uniform), so a sum near -140 carries float32 rounding of ~1e-5 by itself;
we allow 1e-5 + 1e-6·|value|. An off-by-one shift, a dropped token or bf16 log-softmax is off by >= 1e-2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tiny_models import make_tiny_model

import stages.stage2_score_ref as stage2
from pipeline import schema
from pipeline.config import config_from_dict
from pipeline.data.entries import PLAN, TokenizedData, find_reference, reference_key, tokenized_key
from pipeline.data.reference_build import ReferenceBuild
from pipeline.errors import CacheError
from pipeline.models.forward import collate_pairs, sequence_forward
from pipeline.models.loading import load_causal_lm
from stages.stage1_tokenize import run_tokenize
from stages.stage2_score_ref import run_score_ref

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 48
ATOL, RTOL = 1e-5, 1e-6

# Explicit-prompt standard rows; completions from 1 to ~40 tokens, chosen longer in some pairs and rejected
# in others, and two pairs that max_length truncates (their completions lose the end, EOS included).
ROWS = [
    {
        "prompt": "What is the capital of France?",
        "chosen": " Paris.",
        "rejected": " I think it might be Lyon, or possibly Marseille, but I am really not sure.",
    },
    {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"},
    {
        "prompt": "Write a haiku about rain.",
        "chosen": " Soft rain on the roof,\nthe garden drinks in silence,\nclouds walk slowly home.",
        "rejected": " Rain.",
    },
    {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " Hello there, how are you doing today?"},
    {"prompt": "Translate 'chat' from French.", "chosen": " Cat.", "rejected": " Chat means to talk."},
    {"prompt": "Name three primary colours.", "chosen": " Red, yellow and blue.", "rejected": " Green."},
    {"prompt": "Is the earth flat? Answer in one word.", "chosen": " No.", "rejected": " Yes, obviously."},
    {
        "prompt": "Tell me a long story about a dragon who learned to bake bread in a small village.",
        "chosen": " Once upon a time a dragon named Ember lived above a village that smelled of fresh bread "
        "every morning, and he longed to learn how it was made.",
        "rejected": " No.",
    },
    {"prompt": "Describe the sea.", "chosen": " Vast, blue and restless under a changing sky.", "rejected": " Wet."},
    {"prompt": "Count to five.", "chosen": " 1, 2, 3, 4, 5.", "rejected": " 1, 2, 4."},
    {
        "prompt": "Why is the sky blue?",
        "chosen": " Sunlight scatters off air molecules, and blue light scatters most.",
        "rejected": " Because the ocean reflects onto it, which is a common myth that many people still believe "
        "even though it is not true at all, as any good physics textbook will explain to you in some "
        "detail, with diagrams and equations.",
    },
    {"prompt": "Give me a word that rhymes with cat.", "chosen": " Hat.", "rejected": " Dog."},
]


def make_cfg(model_dir, root, **kw):
    return config_from_dict(
        {
            "model": str(model_dir),
            "cache_dir": str(root / "cache"),
            "output_dir": str(root / "out"),
            "max_length": MAX_LENGTH,
            **kw,
        }
    )


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_scores(ref) -> dict[str, dict]:
    return {r[schema.PAIR_ID]: r for r in pq.ParquetDataset(ref.files).read().to_pylist()}


def mtimes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in path.iterdir()}


def assert_close(actual, expected, what):
    assert abs(actual - expected) <= ATOL + RTOL * abs(expected), f"{what}: {actual} vs {expected}"


# --- the independent per-pair reference ---


def token_logps(model, ids: list[int], start: int) -> list[float]:
    """log p(x_t | x_<t) for every completion token t >= max(start, 1) of ONE unpadded sequence, float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]  # (L, V), no padding, no mask
    logp = torch.log_softmax(logits.double(), dim=-1)
    return [logp[t - 1, ids[t]].item() for t in range(max(start, 1), len(ids))]


def independent_scores(model_dir, rows: list[dict]) -> dict[str, dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = {}
    for r in rows:
        c = token_logps(model, r[schema.CHOSEN_INPUT_IDS], r[schema.CHOSEN_COMPLETION_START])
        j = token_logps(model, r[schema.REJECTED_INPUT_IDS], r[schema.REJECTED_COMPLETION_START])
        k = min(len(c), len(j))
        out[r[schema.PAIR_ID]] = {
            schema.REF_CHOSEN_LOGPS: sum(c),
            schema.REF_REJECTED_LOGPS: sum(j),
            schema.CHOSEN_TOKENS: len(c),
            schema.REJECTED_TOKENS: len(j),
            schema.REF_CHOSEN_SHARED_LOGPS: sum(c[:k]),
            schema.REF_CHOSEN_TAIL_LOGPS: sum(c[k:]),
            schema.REF_REJECTED_SHARED_LOGPS: sum(j[:k]),
            schema.REF_REJECTED_TAIL_LOGPS: sum(j[k:]),
        }
    return out


def assert_matches(scores: dict[str, dict], expected: dict[str, dict]):
    assert set(scores) == set(expected)
    for pid, want in expected.items():
        got = scores[pid]
        assert got[schema.CHOSEN_TOKENS] == want[schema.CHOSEN_TOKENS]
        assert got[schema.REJECTED_TOKENS] == want[schema.REJECTED_TOKENS]
        for name in (
            schema.REF_CHOSEN_LOGPS,
            schema.REF_REJECTED_LOGPS,
            schema.REF_CHOSEN_SHARED_LOGPS,
            schema.REF_CHOSEN_TAIL_LOGPS,
            schema.REF_REJECTED_SHARED_LOGPS,
            schema.REF_REJECTED_TAIL_LOGPS,
        ):
            assert_close(got[name], want[name], f"{pid} {name}")


# --- one tokenized set and one scored entry, shared by the tests below ---


@pytest.fixture(scope="module")
def stage(ray_session, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    src = write_jsonl(root / "pairs.jsonl", ROWS)
    # Micro-batches of one pair (chosen and rejected packed in one row): every pair meets the same tensors
    # however blocks fall, so a forced, resumed or use_peft run of this entry must be bit-identical.
    cfg = make_cfg(tiny_model_dir, root, precompute_ref_batch_size=1)
    data = run_tokenize(cfg, (src,))
    ref = run_score_ref(cfg, data, shard_pairs=3)
    return cfg, data, ref, src


@pytest.fixture(scope="module")
def tokenized_rows(stage):
    return pq.ParquetDataset(stage[1].files).read().to_pylist()


@pytest.fixture(scope="module")
def expected(stage, tiny_model_dir, tokenized_rows):
    return independent_scores(tiny_model_dir, tokenized_rows)


# --- 1. the numbers ---


def test_stage_scores_equal_independent_per_pair_forward(stage, expected):
    _, data, ref, _ = stage
    assert data.report["pairs_kept"] == len(ROWS) == ref.manifest["rows"]
    assert ref.manifest["shards"] == 4 and ref.manifest["timings"]["pairs_scored_now"] == len(ROWS)
    assert ref.manifest["padding_fraction"] == 0.0  # padding-free rows (the default) compute no padding
    assert data.report["truncated_pairs"] == 2

    scores = read_scores(ref)
    assert_matches(scores, expected)
    for got in scores.values():
        for side in ("chosen", "rejected"):
            total, shared, tail = (got[f"ref_{side}{part}_logps"] for part in ("", "_shared", "_tail"))
            assert_close(shared + tail, total, f"{side} shared + tail")
        # the shorter completion lies entirely in the shared part
        shorter = "chosen" if got[schema.CHOSEN_TOKENS] <= got[schema.REJECTED_TOKENS] else "rejected"
        assert got[f"ref_{shorter}_tail_logps"] == 0.0
    counts = [(s[schema.CHOSEN_TOKENS], s[schema.REJECTED_TOKENS]) for s in scores.values()]
    assert any(c > r for c, r in counts) and any(c < r for c, r in counts)  # both sides get a real tail
    assert max(max(c) for c in counts) >= 20 and min(min(c) for c in counts) <= 3


def test_chunked_padded_and_single_pair_forwards_agree(stage, expected, tokenized_rows):
    """pipeline.models.forward.sequence_forward directly: one padded batch of all 12 pairs with LM-head chunks of 3
    tokens and of 4096, and each pair alone, all against the independent numbers."""
    cfg, _, _, _ = stage
    model = load_causal_lm(cfg.model.model)
    pad_id = 0  # any id: padded positions are masked out
    columns = {k: [r[k] for r in tokenized_rows] for k in schema.TOKENIZED_SCHEMA.names}
    batch = collate_pairs(columns, pad_id)
    b = batch.num_pairs
    assert batch.attention_mask.sum(dim=1).unique().numel() > 5  # many lengths in one padded batch
    with torch.inference_mode():
        small, large = (sequence_forward(model, batch, chunk_size=n) for n in (3, 4096))
        alone = [
            sequence_forward(model, collate_pairs({k: [v[i]] for k, v in columns.items()}, pad_id)) for i in range(b)
        ]
    for i, r in enumerate(tokenized_rows):
        want = expected[r[schema.PAIR_ID]]
        for row, side in ((i, "chosen"), (b + i, "rejected")):
            one = alone[i]
            one_row = 0 if side == "chosen" else 1
            assert int(small.tokens[row]) == int(one.tokens[one_row]) == want[f"{side}_tokens"]
            for field, name in (
                ("logps", f"ref_{side}_logps"),
                ("shared_logps", f"ref_{side}_shared_logps"),
                ("tail_logps", f"ref_{side}_tail_logps"),
            ):
                for how, stats, k in (
                    ("chunks of 3", small, row),
                    ("chunks of 4096", large, row),
                    ("alone", one, one_row),
                ):
                    assert_close(float(getattr(stats, field)[k]), want[name], f"pair {i} {name}, {how}")


# --- 2. cache hit and --force ---


def test_second_run_reuses_and_force_rescores_identically(stage, capsys):
    cfg, data, ref, _ = stage
    before = mtimes(ref.path)
    capsys.readouterr()
    again = run_score_ref(cfg, data, shard_pairs=3)
    out = capsys.readouterr().out
    assert "reusing cached reference scores" in out and "nothing rewritten" in out
    assert again.key == ref.key and again.manifest == ref.manifest
    assert mtimes(ref.path) == before

    forced = run_score_ref(cfg, data, force=True, shard_pairs=3)
    assert forced.key == ref.key and forced.manifest["timings"]["pairs_scored_now"] == len(ROWS)
    assert all(mtimes(ref.path)[name] != before[name] for name in ref.manifest["files"])  # really rewritten
    assert read_scores(forced) == read_scores(ref)  # bit-identical


# --- 3. a real kill mid-way, then resume ---

KILLABLE = """
import json, sys, time
from pathlib import Path
import ray
import stages.stage2_score_ref as stage2
from pipeline.config import config_from_dict
from pipeline.data.entries import TokenizedData

args = json.loads(sys.argv[1])

class SlowScoreRef(stage2._ScoreRef):  # two seconds per block, so the test can kill between blocks
    def __call__(self, block):
        time.sleep(2.0)
        return super().__call__(block)

stage2._ScoreRef = SlowScoreRef
stage2.BLOCK_BATCHES = 3  # blocks of 3 pairs at micro-batch 1
ray.init(address=args["address"], log_to_driver=False, configure_logging=False)
data = TokenizedData(Path(args["path"]), args["key"], args["manifest"])
stage2.run_score_ref(config_from_dict(args["cfg"]), data, shard_pairs=3)
"""


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def test_kill_midway_then_resume_scores_only_missing_shards(stage, tmp_path, capsys):
    """A second driver on this Ray scores with blocks of 3 pairs, 2 s each; it is SIGKILLed as soon as its first
    shard file lands. The rerun keeps those shards untouched and scores only the other pairs."""
    _, data, _, _ = stage
    cfg = stage[0].replace(cache_dir=str(tmp_path / "cache"))
    key, _, _ = reference_key(cfg, data)
    entry = Path(cfg.data.cache_dir) / "reference" / key
    args = {
        "address": ray_address(),
        "path": str(data.path),
        "key": data.key,
        "manifest": data.manifest,
        "cfg": cfg.flat(),
    }
    log = tmp_path / "killed.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLABLE, json.dumps(args)], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.time() + 120
        while not list(entry.glob("shard-*.parquet")):
            assert proc.poll() is None, f"scorer exited early:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no shard after 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no cleanup, like a crash or the OOM killer
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    done = sorted(p.name for p in entry.glob("shard-*.parquet"))
    assert (entry / PLAN).is_file() and not (entry / "manifest.json").exists()
    assert 1 <= len(done) < 4, done
    with pytest.raises(CacheError, match=r"incomplete .*interrupted"):
        find_reference(cfg, data)
    kept_rows = sum(pq.ParquetFile(entry / name).metadata.num_rows for name in done)
    kept_mtimes = {name: (entry / name).stat().st_mtime_ns for name in done}

    capsys.readouterr()
    resumed = run_score_ref(cfg, data, shard_pairs=3)
    out = capsys.readouterr().out
    assert f"resuming {entry}: {len(done)}/4 shards already scored" in out
    assert resumed.manifest["timings"]["pairs_scored_now"] == len(ROWS) - kept_rows
    assert f"{len(ROWS) - kept_rows} pairs scored" in out
    assert {name: (entry / name).stat().st_mtime_ns for name in done} == kept_mtimes  # not rewritten
    assert not (entry / PLAN).exists() and find_reference(cfg, data).key == key
    assert read_scores(resumed) == read_scores(stage[2])  # exactly the uninterrupted run's values


def test_scoring_actor_killed_midway_is_retried(stage, tmp_path, monkeypatch):
    """One scoring actor, blocks of one pair, half a second each; once a shard file has landed the actor
    process is SIGKILLed. Ray Data restarts the actor and retries its block (max_restarts and
    max_task_retries are unlimited for its actor pools): the same run completes, with exactly the
    uninterrupted run's scores."""
    import threading

    cfg, data, ref, _ = stage
    cfg = cfg.replace(cache_dir=str(tmp_path / "cache"))
    entry = Path(cfg.data.cache_dir) / "reference" / ref.key
    pids = tmp_path / "pids"
    pids.mkdir()

    class Slow(stage2._ScoreRef):
        def __call__(self, block):
            (pids / str(os.getpid())).touch()
            time.sleep(0.5)
            return super().__call__(block)

    monkeypatch.setattr(stage2, "_ScoreRef", Slow)
    monkeypatch.setattr(stage2, "BLOCK_BATCHES", 1)
    killed: list[int] = []

    def kill_actor_midway() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not (list(entry.glob("shard-*.parquet")) and list(pids.iterdir())):
            time.sleep(0.05)
        victim = int(next(pids.iterdir()).name)
        os.kill(victim, 9)
        killed.append(victim)

    killer = threading.Thread(target=kill_actor_midway, daemon=True)
    killer.start()
    scored = run_score_ref(cfg, data, shard_pairs=3)
    killer.join(timeout=5)
    assert killed, "the actor was never killed"
    survivors = {int(p.name) for p in pids.iterdir()} - set(killed)
    assert survivors, "no actor scored after the kill"  # a restarted actor (a new process) finished the job
    assert scored.manifest["timings"]["pairs_scored_now"] == len(ROWS)
    assert len(scored.manifest["files"]) == 4
    assert find_reference(cfg, data).key == ref.key
    assert read_scores(scored) == read_scores(ref)


# --- 4. refusals ---


def test_corrupt_truncated_edited_and_missing_entries_are_refused(stage, tmp_path):
    cfg, data, ref, _ = stage
    cfg = cfg.replace(cache_dir=str(tmp_path / "cache"))
    entry = Path(cfg.data.cache_dir) / "reference" / ref.key
    shutil.copytree(ref.path, entry)
    assert read_scores(find_reference(cfg, data)) == read_scores(ref)  # a faithful copy is valid

    victim = entry / "shard-00002.parquet"
    good = victim.read_bytes()
    blob = bytearray(good)
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    with pytest.raises(CacheError, match=r"shard-00002\.parquet fails its checksum"):
        run_score_ref(cfg, data, shard_pairs=3, verify=True)  # same size: only --verify reads the bytes
    victim.write_bytes(good[:-10])
    with pytest.raises(CacheError, match=r"shard-00002\.parquet has \d+ bytes.*truncated"):
        find_reference(cfg, data)
    victim.write_bytes(good)

    manifest = json.loads((entry / "manifest.json").read_text())
    (entry / "manifest.json").write_text(json.dumps({**manifest, "key": "0" * 32}))
    with pytest.raises(CacheError, match="does not match the expected key"):
        run_score_ref(cfg, data, shard_pairs=3)

    # an unfinished entry: shard files that contradict the plan are refused before any scoring
    (entry / "manifest.json").unlink()
    counts = {p.name: pq.ParquetFile(p).metadata.num_rows for p in sorted(entry.glob("shard-*.parquet"))}
    (entry / PLAN).write_text(json.dumps({"key": ref.key, "num_shards": 4}))
    with pytest.raises(CacheError, match=r"planned as \{.*'num_shards': 4\}, now \{.*'num_shards': 6\}"):
        run_score_ref(cfg, data, shard_pairs=2)
    b = next(iter(counts))
    (entry / b).write_bytes((entry / b).read_bytes()[:100])
    with pytest.raises(CacheError, match=f"{b} is unreadable"):
        run_score_ref(cfg, data, shard_pairs=3)
    a = next(n for n in counts if counts[n] != counts[b])  # a shard of another size put in b's place
    shutil.copy(entry / a, entry / b)
    with pytest.raises(CacheError, match=f"{b} has {counts[a]} rows, expected {counts[b]}"):
        run_score_ref(cfg, data, shard_pairs=3)

    missing = cfg.replace(cache_dir=str(tmp_path / "empty"))
    with pytest.raises(CacheError) as e:
        find_reference(missing, data)
    msg = str(e.value)
    assert "no cache entry at" in msg and "`dpo-pipeline score-ref`" in msg
    assert str(cfg.model.model) in msg and "float32" in msg


# --- 5. what the key covers ---


def test_key_covers_tokenization_and_weights_but_no_training_setting(stage, tiny_model_dir, tokenizer, tmp_path):
    cfg, data, ref, src = stage
    assert reference_key(cfg, data)[0] == ref.key

    def key_for(c, specs=(src,)):
        tok_key = tokenized_key(c, specs)[0]
        return reference_key(c, TokenizedData(Path("unused"), tok_key, {}))[0]

    assert key_for(cfg) == ref.key
    changed = {
        "max_length": key_for(cfg.replace(max_length=MAX_LENGTH + 1)),
        "truncation_mode": key_for(cfg.replace(truncation_mode="keep_end")),
        "data": key_for(cfg, (write_jsonl(tmp_path / "other.jsonl", [*ROWS[:-1], {**ROWS[-1], "chosen": " Bat."}]),)),
        "dtype": key_for(cfg.replace(dtype="bfloat16")),
        "weights": key_for(cfg.replace(ref_model=str(make_tiny_model(tmp_path / "other", tokenizer, seed=1)))),
    }
    assert len({ref.key, *changed.values()}) == 1 + len(changed), changed

    same = {
        "beta": cfg.replace(beta=0.5),
        "loss_type": cfg.replace(loss_type=("ipo", "sft"), loss_weights=(1.0, 0.2)),
        "ld_alpha": cfg.replace(ld_alpha=0.3),
        "label_smoothing": cfg.replace(label_smoothing=0.2),
        "f_divergence": cfg.replace(f_divergence_type="js_divergence"),
        "use_peft": cfg.replace(use_peft=True, lora_r=4, lora_alpha=8),
        "learning_rate": cfg.replace(learning_rate=3e-4, num_train_epochs=1.0, seed=7),
        "batching": cfg.replace(per_device_train_batch_size=2, precompute_ref_batch_size=16, ref_actors=2),
        "ref_model = model": cfg.replace(ref_model=str(tiny_model_dir)),
        "output_dir": cfg.replace(output_dir=str(tmp_path / "elsewhere")),
    }
    for what, c in same.items():
        assert reference_key(c, data)[0] == ref.key, what


def test_key_changes_when_one_embedding_row_changes(stage, tmp_path):
    cfg, data, ref, _ = stage
    model = load_causal_lm(cfg.model.model)
    with torch.no_grad():
        model.model.embed_tokens.weight[1000].mul_(3.0)  # e.g. a retrained special token
    model.save_pretrained(tmp_path / "edited")
    shutil.copy(Path(cfg.model.model) / "config.json", tmp_path / "edited" / "config.json")
    assert reference_key(cfg.replace(ref_model=str(tmp_path / "edited")), data)[0] != ref.key


# --- 6. with LoRA the reference is the base model ---


def test_use_peft_reference_is_the_base_model(stage, expected, capsys):
    """The reference is `ref_model` or `model`, the base weights, never an adapter: same key, so the same entry,
    whose scores are the base model's (the independent forward above loads the base directory alone)."""
    cfg, data, ref, _ = stage
    peft = cfg.replace(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=("q_proj", "v_proj"))
    assert reference_key(peft, data) == reference_key(cfg, data)
    capsys.readouterr()
    scored = run_score_ref(peft, data, shard_pairs=3)
    assert "reusing cached reference scores" in capsys.readouterr().out
    assert scored.path == ref.path and scored.key == ref.key
    assert_matches(read_scores(scored), expected)


# --- 7. several actors ---


def test_two_actors_batches_of_four_and_one_pair_shards(ray_session, stage, expected, tmp_path, monkeypatch):
    """Two actors with one CPU each, blocks of one micro-batch of 4 mixed-length pairs, and shard_pairs=1:
    12 shards, some of them empty. Each actor call leaves its process id behind, so we see both actors work."""
    cfg, data, ref, _ = stage
    calls = tmp_path / "calls"
    calls.mkdir()

    class Recording(stage2._ScoreRef):
        def __call__(self, block):
            (calls / f"{os.getpid()}-{time.time_ns()}").touch()
            return super().__call__(block)

    monkeypatch.setattr(stage2, "_ScoreRef", Recording)
    monkeypatch.setattr(ray_session.data.DataContext.get_current(), "wait_for_min_actors_s", 120)  # both up
    monkeypatch.setattr(stage2, "BLOCK_BATCHES", 1)
    two = cfg.replace(ref_actors=2, precompute_ref_batch_size=4, cache_dir=str(tmp_path / "cache"))
    scored = run_score_ref(two, data, shard_pairs=1)
    assert scored.key == ref.key and scored.manifest["shards"] == len(ROWS)
    sizes = [pq.ParquetFile(f).metadata.num_rows for f in scored.files]
    assert sum(sizes) == len(ROWS) and 0 in sizes
    pids = [p.name.split("-")[0] for p in calls.iterdir()]
    assert len(pids) == 3 and len(set(pids)) == 2, pids  # 3 blocks of 4 pairs, spread over both actors
    assert_matches(read_scores(scored), expected)


def test_a_token_budget_cuts_the_scoring_batches_and_changes_no_score(stage, expected, tmp_path):
    """precompute_ref_max_tokens: micro-batches of at most 4 pairs and 60 tokens (padding-free: the pairs' own
    tokens; padded: 2 x pairs x the longest), every pair once, the longest alone when it exceeds the budget; the
    entry scored that way equals the independent forward."""
    cfg, data, _, _ = stage
    columns = pq.ParquetDataset(data.files).read().to_pydict()
    lengths = [(len(c), len(r)) for c, r in zip(columns[schema.CHOSEN_INPUT_IDS], columns[schema.REJECTED_INPUT_IDS])]
    scorer = stage2._ScoreRef.__new__(stage2._ScoreRef)  # its batching alone, without a model
    for padding_free, cost in ((True, lambda b: sum(sum(lengths[i]) for i in b)),
                               (False, lambda b: 2 * len(b) * max(max(lengths[i]) for i in b))):  # fmt: skip
        scorer.micro_batch, scorer.max_tokens, scorer.padding_free = 4, 60, padding_free
        batches = scorer.micro_batches(columns)
        assert sorted(int(i) for b in batches for i in b) == list(range(len(ROWS)))
        assert all(len(b) <= 4 and (cost(b) <= 60 or len(b) == 1) for b in batches)
        assert len(batches) > len(ROWS) // 4  # the budget, not the pair count, cut some
    scorer.max_tokens = None
    assert [len(b) for b in scorer.micro_batches(columns)] == [4, 4, 4]

    budget = cfg.replace(precompute_ref_batch_size=4, precompute_ref_max_tokens=60, cache_dir=str(tmp_path / "c"))
    assert_matches(read_scores(run_score_ref(budget, data, shard_pairs=3)), expected)


# --- 8. every split on one pool ---


def test_splits_share_one_pool_and_each_gets_its_own_entry(stage, expected, tmp_path, monkeypatch, capsys):
    """Train, eval and a third split with the train split's data, scored by one call: the reference model loads
    once (one actor, whose setup leaves its process id behind); the eval pairs, all of them train pairs too, land
    in both entries; each entry equals the independent forward; the third split reuses the train entry."""
    cfg, _, ref, src = stage
    loads = tmp_path / "loads"
    loads.mkdir()

    class Recording(stage2._ScoreRef):
        def setup(self, *args):
            (loads / str(os.getpid())).touch()
            super().setup(*args)

    monkeypatch.setattr(stage2, "_ScoreRef", Recording)
    fresh = cfg.replace(cache_dir=str(tmp_path / "cache"))
    train = run_tokenize(fresh, (src,))
    evals = run_tokenize(fresh, (write_jsonl(tmp_path / "eval.jsonl", ROWS[:5]),), "eval")
    eval_ids = {r[schema.PAIR_ID] for r in pq.ParquetDataset(evals.files).read().to_pylist()}
    assert len(eval_ids) == 5 and eval_ids < set(expected)
    capsys.readouterr()
    scored = stage2.score_splits(fresh, {"train": train, "eval": evals, "again": train}, shard_pairs=3)
    out = capsys.readouterr().out
    assert len(list(loads.iterdir())) == 1
    assert scored["train"].key == ref.key and scored["eval"].key != ref.key
    assert scored["train"].manifest["shards"] == 4 and scored["eval"].manifest["shards"] == 2
    assert_matches(read_scores(scored["train"]), expected)
    assert_matches(read_scores(scored["eval"]), {pid: expected[pid] for pid in eval_ids})
    assert scored["again"].path == scored["train"].path
    assert "[score-ref] again: reusing cached reference scores" in out
    assert "[score-ref] train: 12 pairs scored" in out and "[score-ref] eval: 5 pairs scored" in out


def test_an_entry_short_of_scored_pairs_gets_no_manifest(stage, tmp_path):
    cfg, data, _, _ = stage
    path = tmp_path / "entry"
    entry = ReferenceBuild("eval", data, "k", {}, path, pairs=12, expected=np.array([6, 6]), missing=frozenset({0, 1}))
    entry.totals["pairs"] = 11
    with pytest.raises(CacheError, match="eval: 11 pairs came back from the scoring pool, 12 were sent"):
        entry.commit(cfg)
    assert not path.exists()


def test_killed_after_its_last_shard_the_entry_is_committed_without_scoring(stage, tmp_path, capsys):
    """A job killed between its last shard and the manifest leaves plan.json and every shard: the rerun scores
    nothing (no actor starts) and writes the manifest over the same shards."""
    cfg, data, ref, _ = stage
    copy = tmp_path / "cache" / "reference" / ref.key
    shutil.copytree(ref.path, copy)
    (copy / "manifest.json").unlink()
    (copy / PLAN).write_text(json.dumps({"key": ref.key, "num_shards": ref.manifest["shards"]}))
    capsys.readouterr()
    again = run_score_ref(cfg.replace(cache_dir=str(tmp_path / "cache")), data, shard_pairs=3)
    out = capsys.readouterr().out
    assert "4/4 shards already scored" in out and "[score-ref] train: 0 pairs scored" in out
    assert "kernels" not in out  # nothing was set up to score
    assert again.manifest["files"] == ref.manifest["files"] and not (copy / PLAN).exists()
