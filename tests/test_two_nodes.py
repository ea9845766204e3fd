"""Two raylets on this host (`ray.cluster_utils.Cluster`): a head and a worker node of 1 CPU each. `run` with
2 training workers and 2 scoring actors places one of each on each node, and gives the metrics of the same
run on one node of 2 CPUs. Everything the stages share goes through cache_dir and output_dir; the workers
reach the training table through its cache entry, never through the driver."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import ray
    from ray.cluster_utils import Cluster

    # Default node address: a driver given 127.0.0.1 rewrites it to the host's IP (resolve_ip_for_localhost)
    # and then waits forever for a GCS that listens on the loopback only.
    # The dashboard serves the state API (list_actors) that reports where each actor ran.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    ray.init(address=cluster.address)  # this driver's own connection: the command leaves it open (pipeline.console)
    from stages.cli import main
    rc = main(sys.argv[1:])
    from ray.util.state import list_actors
    placed = [(a.class_name, a.node_id) for a in list_actors(limit=1000, raise_on_missing_output=False)]
    print("PLACED " + json.dumps({"rc": rc, "actors": placed, "nodes": len(ray.nodes())}))
    ray.shutdown()
    cluster.shutdown()
    """
)


def run_args(nodes: int, root: Path, tiny_model_dir: Path) -> list[str]:
    data = root / "train.jsonl"
    words = ["red", "blue", "green", "gold", "black", "white"]
    rows = [{"prompt": f"Colour {i}?", "chosen": f" {words[i % 6]} {i}", "rejected": f" no {i + 1}"} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # no stage 4 (--max_new_tokens 0): what is compared is scoring and training
    return [
        "run", "--model", str(tiny_model_dir), "--dataset", str(data), "--eval_dataset", str(data),
        "--cache_dir", str(root / f"cache-{nodes}"), "--output_dir", str(root / f"out-{nodes}"), "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--logging_steps", "1", "--learning_rate", "1e-3",
        "--num_workers", "2", "--cpus_per_worker", "1", "--ref_actors", "2", "--cpus_per_ref_actor", "1",
        "--zero_stage", "2", "--gradient_checkpointing", "false", "--max_new_tokens", "0",
    ]  # fmt: skip


def metrics_of(root: Path, nodes: int) -> list[dict]:
    return [json.loads(x) for x in (root / f"out-{nodes}" / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_match_one_node(ray_session, tmp_path, tiny_model_dir):
    """The two-node run in its own process and cluster; the same run on one node of 2 CPUs is this session's Ray."""
    from stages.cli import main

    argv = [sys.executable, "-c", SCRIPT, *run_args(2, tmp_path, tiny_model_dir)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
    line = next((x for x in done.stdout.splitlines() if x.startswith("PLACED ")), None)
    assert done.returncode == 0 and line, done.stdout[-3000:] + done.stderr[-3000:]
    two = json.loads(line[len("PLACED ") :])
    assert two["rc"] == 0 and two["nodes"] == 2
    assert ray_session.cluster_resources()["CPU"] == 2 and len(ray_session.nodes()) == 1
    assert main(run_args(1, tmp_path, tiny_model_dir)) == 0
    metrics_two, metrics_one = metrics_of(tmp_path, 2), metrics_of(tmp_path, 1)

    def nodes_of(actors: list, name: str) -> set:
        return {node for cls, node in actors if name in cls}

    assert len(nodes_of(two["actors"], "TrainWorker")) == 2, two["actors"]  # one training worker per node
    assert len(nodes_of(two["actors"], "_ScoreRef")) == 2, two["actors"]  # one scoring actor per node
    assert [m["step"] for m in metrics_two] == [m["step"] for m in metrics_one]
    for a, b in zip(metrics_two, metrics_one):
        for key in ("loss", "eval_loss", "rewards/margins", "eval_rewards/margins", "grad_norm"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=2e-4), (a["step"], key)
    first = metrics_two[0]
    assert first["eval_loss"] == pytest.approx(0.6931472, abs=1e-5) and abs(first["eval_rewards/margins"]) < 1e-6
