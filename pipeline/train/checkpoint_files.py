"""A rank's part of a checkpoint: what it reads back to resume, without every other rank's files.

    with rank_checkpoint(checkpoint, rank) as folder:   # a Ray Train Checkpoint
        engine.load_checkpoint(folder, tag=...)

Ray Train keeps one checkpoint folder in `storage_path` holding every rank's DeepSpeed files: the model states
(`mp_rank_00_model_states.pt`, written by data-parallel rank 0: the whole model at ZeRO 0-2), each rank's
optimizer partition (`zero_pp_rank_{r}_mp_rank_00_optim_states.pt`; `bf16_zero_pp_rank_...` with bf16) and,
at ZeRO-3, each rank's parameter partition (`zero_pp_rank_{r}_mp_rank_00_model_states.pt`), and the loop's
state.json. A rank loads the shared files and its own partitions only (the world size cannot change across a
resume: `pipeline.train.resume` refuses it). `Checkpoint.as_directory` would download all of them to every
worker — every rank's partitions, ~1 TB for a 70B run on 64 ranks — so on an object store a rank fetches its
own files alone; a checkpoint on a local or shared filesystem is read where it is.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

RANK_FILE = re.compile(r"(?:^|_)pp_rank_(\d+)_")  # DeepSpeed's per-data-parallel-rank files


def rank_needs(name: str, rank: int) -> bool:
    """Whether `rank` reads the checkpoint file `name`: a shared file, or one of its own partitions."""
    owner = RANK_FILE.search(name)
    return owner is None or int(owner.group(1)) == rank


@contextlib.contextmanager
def rank_checkpoint(checkpoint: Any, rank: int) -> Iterator[str]:
    """A local folder with what `rank` needs of a Ray Train `checkpoint` (the folder itself when local), and a
    line saying what was fetched."""
    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    if isinstance(fs, pafs.LocalFileSystem):
        yield root
        return
    files = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
    wanted = [i for i in files if rank_needs(i.path.rsplit("/", 1)[-1], rank)]
    local = Path(tempfile.mkdtemp(prefix=f"resume-rank{rank}-"))
    try:
        for info in wanted:
            target = local / info.path[len(root) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        fetched = sum(i.size or 0 for i in wanted)
        total = sum(i.size or 0 for i in files)
        print(
            f"[train] rank {rank}: fetched {len(wanted)} of the checkpoint's {len(files)} files, "
            f"{fetched / 1e6:.1f} of {total / 1e6:.1f} MB",
            flush=True,
        )
        yield str(local)
    finally:
        shutil.rmtree(local, ignore_errors=True)
