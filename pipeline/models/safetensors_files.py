"""safetensors files a tensor at a time: read as views of the memory-mapped files, written as tensors come.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header
mapping each tensor's name to its dtype, shape and byte range in the data that follows (plus `__metadata__`),
padded with spaces to a multiple of 8 bytes. Knowing it lets a ZeRO-3 rank load a checkpoint one module at a time
without copying the whole file into its memory, and the export write a shard whose tensors are gathered one by one.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any, BinaryIO

import torch

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
FROM_NAME = {name: dtype for dtype, name in DTYPES.items()}


def checkpoint_files(model_dir: str | Path) -> list[Path] | None:
    """The safetensors files of an HF directory (one file, or the shards its index names); None if it has none."""
    root = Path(model_dir)
    if (root / INDEX).is_file():
        names = sorted(set(json.loads((root / INDEX).read_text())["weight_map"].values()))
    else:
        names = [WEIGHTS]
    files = [root / name for name in names]
    return files if all(f.is_file() for f in files) else None


def mapped_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of `files` as a view of its file, mapped copy-on-write: nothing is read until a tensor is used,
    and what is read stays in the page cache (file-backed, shared by every process of the node, reclaimable), not
    in this process's own memory. Copying from them into a model's parameters reads one tensor at a time."""
    out = {}
    for path in files:
        with open(path, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # each view keeps the mapping alive
        size = int.from_bytes(mapped[:8], "little")
        header = json.loads(mapped[8 : 8 + size])
        header.pop("__metadata__", None)
        for key, info in header.items():
            if info["dtype"] not in FROM_NAME:
                raise ValueError(f"{path}: tensor {key} has dtype {info['dtype']}, which this loader does not read")
            dtype, (start, end) = FROM_NAME[info["dtype"]], info["data_offsets"]
            if end == start:
                out[key] = torch.empty(info["shape"], dtype=dtype)
                continue
            count = (end - start) // dtype.itemsize
            out[key] = torch.frombuffer(mapped, dtype=dtype, count=count, offset=8 + size + start).view(info["shape"])
    return out


def write_header(fh: BinaryIO, entries: list[tuple[str, torch.dtype, list[int]]]) -> None:
    """The header of a file whose tensors (name, dtype, shape) will follow in this order, contiguous."""
    offset = 0
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for key, dtype, shape in entries:
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        header[key] = {"dtype": DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    fh.write(len(encoded).to_bytes(8, "little") + encoded)


def write_tensor(fh: BinaryIO, value: torch.Tensor) -> None:
    """The next tensor's bytes (a host tensor, contiguous), written from a view: no second copy."""
    fh.write(value.reshape(-1).view(torch.uint8).numpy().data)
