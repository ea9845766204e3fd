"""Probes that tests/test_fingerprints.py runs in fresh processes, so that nothing remembered in the test's own
process can spare a read. Each prints one JSON line; bytes read are /proc/self/io `rchar`.

    python tests/fingerprint_probe.py memo FILE CACHE_DIR
    python tests/fingerprint_probe.py keys CONFIG_JSON first|repeat
    python tests/fingerprint_probe.py hub CACHE_DIR REFS_FILE COMMIT...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def rchar() -> int:
    """Bytes this process has read so far: what every read call returned, from the page cache or the disk."""
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("rchar")).split()[1])


def memo(path: str, cache_dir: str) -> dict[str, Any]:
    """Fingerprint one file; the bytes that took."""
    from pipeline.cache.fingerprints import file_fingerprints

    start = rchar()
    digest = file_fingerprints([Path(path)], cache_dir)[0]
    return {"read": rchar() - start, "digest": digest}


def keys(config: str, mode: str) -> dict[str, Any]:
    """What `run` asks on cached stages, per split, train and eval: stages 1 and 2 compute their keys and reuse
    their entries, stage 3 looks both up again. The first run writes stand-ins for the two entries first.
    `tokenizer`: what loading the tokenizer reads by itself, as often as tokenized_key loads it (once per process:
    `model_tokenizer_fingerprint`); a constant, whatever the size of the weights."""
    from pipeline.cache import manifests
    from pipeline.config import config_from_dict
    from pipeline.data.entries import (
        REFERENCE,
        TOKENIZED,
        TokenizedData,
        find_reference,
        find_tokenized,
        reference_key,
        reusable,
        tokenized_key,
    )
    from pipeline.models.loading import load_tokenizer

    cfg = config_from_dict(json.loads(config)).with_absolute_paths()
    splits = [cfg.data.dataset, cfg.data.eval_dataset]

    def entry(kind: str, key: str) -> Any:
        path = manifests.entry_dir(cfg.data.cache_dir, kind, key)
        if mode == "first":
            path.mkdir(parents=True)
            (path / "data.parquet").write_bytes(b"x" * 1000)
            manifests.write_manifest(path, key, kind, ["data.parquet"], rows=1)
        return path

    load_tokenizer(cfg.model.model)  # the imports that loading a tokenizer makes, before counting
    start = rchar()
    load_tokenizer(cfg.model.model)
    tokenizer = rchar() - start

    start = rchar()
    for specs in splits:
        key = tokenized_key(cfg, specs)[0]
        path = entry(TOKENIZED, key)
        tok = TokenizedData(path, key, reusable(path, key, "[tokenize]", "tokenized data"))
        ref_key = reference_key(cfg, tok)[0]
        reusable(entry(REFERENCE, ref_key), ref_key, "[score-ref]", "reference scores", resumable=True)
    for specs in splits:
        find_reference(cfg, find_tokenized(cfg, specs))
    return {"read": rchar() - start, "tokenizer": tokenizer}


def hub(cache_dir: str, refs: str, *commits: str) -> dict[str, Any]:
    """The fingerprint of hub id org/tiny with `main` naming each commit in turn (HF_HUB_CACHE set by the
    caller), and the error for a hub id with no local snapshot."""
    from pipeline.errors import PipelineError
    from pipeline.models.loading import weights_fingerprint

    out = {}
    for commit in commits:
        Path(refs).write_text(commit)
        out[commit] = weights_fingerprint("org/tiny", cache_dir)
    try:
        weights_fingerprint("org/absent", cache_dir)
    except PipelineError as e:
        out["absent"] = str(e)
    return out


if __name__ == "__main__":
    probe = {"memo": memo, "keys": keys, "hub": hub}[sys.argv[1]]
    print(json.dumps(probe(*sys.argv[2:])))
