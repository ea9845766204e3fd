"""Run a function on `world` local processes joined in one gloo process group, as Ray Train joins its workers
(torch.distributed, then DeepSpeed's communicator wrapping it), without Ray: for tests of the collectives
inside one forward and backward, which need no trainer around them."""

from __future__ import annotations

import multiprocessing
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 600) -> list[Any]:
    """[fn(rank, world, *args) for each rank], each run in its own fresh interpreter; a rank's exception is
    raised here with its traceback. `fn` must be importable (a module-level function)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results: Any = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, world, port, args, results)) for rank in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        while len(out) < world:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(
                    f"ranks {sorted(set(range(world)) - set(out))} sent nothing in {timeout} s"
                ) from None
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world)]


def _rank_main(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, results: Any) -> None:
    try:
        import torch
        import torch.distributed as dist

        from pipeline.train.engine import init_deepspeed_comm

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        init_deepspeed_comm(dist_backend="gloo", dist_init_required=False)
        value = fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(value)))  # plain bytes: no tensor shared with an exiting process
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
