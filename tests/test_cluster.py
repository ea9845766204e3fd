"""cluster/: the manifests are valid for the tools that read them and run the CLI we ship; and the pipeline
runs as two `ray job submit` jobs on a real Ray head on 127.0.0.1 with token auth, sharing one cache.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import yaml

from pipeline.config import load_config
from pipeline.redact import is_secret_name
from stages.cli_args import COMMANDS, build_parser

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAY_BIN = Path(sys.executable).parent / "ray"
IMAGE = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)-py(?P<py>3\d+)-(?P<platform>cpu|gpu|cu\d+)$")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def constraints() -> dict[str, str]:
    """The versions CI runs with: constraints.txt, and torch as the Makefile installs it."""
    torch = re.search(r"^TORCH \?= torch==(\S+)", (REPO / "Makefile").read_text(), re.M)
    pins = {"torch": torch.group(1)}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def check_image(image: str, gpu: bool) -> None:
    m = IMAGE.match(image)
    assert m, f"{image} is not a rayproject/ray:<version>-py3XX-<cpu|gpu|cuXXX> tag"
    assert m["version"] == ray.__version__, f"{image}: the cluster must run the Ray we test with ({ray.__version__})"
    assert int(m["py"][1:]) >= 10, f"{image}: pyproject requires Python >= 3.10"
    assert (m["platform"] != "cpu") == gpu, f"{image}: {'GPU' if gpu else 'CPU'} image expected"


def check_command(line: str) -> list[list[str]]:
    """Every `&&`-joined command is our CLI (`dpo-pipeline X` or `python -m pipeline X`), accepted by its parser,
    and any --config file is in the repository and loads."""
    commands = []
    for part in line.split("&&"):
        argv = shlex.split(part)
        if argv[:3] == ["python", "-m", "pipeline"]:
            argv = argv[3:]
        else:
            assert argv[0] == "dpo-pipeline", f"not our CLI: {part!r}"
            argv = argv[1:]
        assert argv[0] in COMMANDS, f"unknown command {argv[0]!r}"
        args = build_parser().parse_args(argv)  # exits (SystemExit) on an unknown flag
        if getattr(args, "config", None):
            load_config(REPO / args.config)
        commands.append(argv)
    return commands


SUBMITTED = re.compile(r' -- (?:bash -c "([^"]*)"|((?:python -m pipeline|dpo-pipeline) [^`\n\\|]*))')


def documented_commands(text: str) -> list[list[str]]:
    """Each command after ` -- ` (or inside ` -- bash -c "..."`) in some documentation, checked by check_command."""
    return [argv for m in SUBMITTED.finditer(text) for argv in check_command((m.group(1) or m.group(2)).strip())]


# --- the manifests ---


def test_runtime_env_is_valid_for_ray_and_pins_our_versions():
    from ray.runtime_env import RuntimeEnv

    env = load("runtime_env.yaml")
    assert set(env) <= RuntimeEnv.known_fields
    RuntimeEnv(**env)  # Ray's own validation of each field's value
    pins = constraints()
    for spec in env["pip"]["packages"]:
        name, version = spec.split("==")
        assert pins[name.lower().replace("_", "-")] == version, f"{spec} differs from constraints.txt"
    assert {".venv/", ".cache/", "runs/"} <= set(env["excludes"])
    assert env["env_vars"] and not any(is_secret_name(k) for k in env["env_vars"])  # no secrets in a runtime env


def test_cluster_launcher_config_passes_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("aws.yaml")
    validate_config(prepare_config(config))  # the launcher's own schema (with its defaults filled in, as `ray up`)
    check_image(config["docker"]["image"], gpu=True)
    check_image(config["docker"]["head_image"], gpu=False)
    assert set(config["available_node_types"]) == {"head", "gpu_worker"}
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert documented_commands((CLUSTER / "aws.yaml").read_text())  # the header's job submission


def _containers(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize(
    "name", ["kuberay/raycluster.yaml", "kuberay/rayjob-score-ref.yaml", "kuberay/rayjob-train.yaml"]
)
def test_kuberay_manifests(name):
    from ray.runtime_env import RuntimeEnv

    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    spec = doc["spec"]
    cluster = spec if doc["kind"] == "RayCluster" else spec["rayClusterSpec"]
    assert doc["kind"] in ("RayCluster", "RayJob")
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}
    for group, container in _containers(cluster):
        gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        check_image(container["image"], gpu=gpus > 0)
        assert (group == "head") == (gpus == 0)
    if doc["kind"] == "RayJob":
        commands = check_command(spec["entrypoint"])
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert set(env) <= RuntimeEnv.known_fields
        RuntimeEnv(**env)
        pins = constraints()
        assert all(pins[p.split("==")[0].lower().replace("_", "-")] == p.split("==")[1] for p in env["pip"])
        assert spec["shutdownAfterJobFinishes"] is True
        stage = "train" if "train" in name else "score-ref"
        assert commands[-1][0] == stage


def test_cluster_config_is_on_shared_storage():
    cfg = load_config(REPO / "configs" / "cluster.yaml")
    for value in (cfg.data.cache_dir, cfg.data.output_dir, cfg.scale.storage_path):
        assert value.startswith("s3://")
    assert cfg.scale.use_gpu and cfg.scale.ref_actors != cfg.scale.num_workers  # scaled independently


# Llama-3.1's shapes (config.json of the 8B and 70B checkpoints): parameters, layers, hidden, MLP size
LLAMA = {"8b": (8.03e9, 32, 4096, 14336), "70b": (70.6e9, 80, 8192, 28672)}
VOCAB = 128256


@pytest.mark.parametrize(("preset", "size"), [("preset-8b-1node.yaml", "8b"), ("preset-70b-8nodes.yaml", "70b")])
def test_presets_load_and_the_guide_states_their_per_gpu_sum(preset, size):
    """Each preset is a valid config (ZeRO-3, token budgets for training and scoring, gradient checkpointing,
    an eval cadence), and the cluster guide's per-GPU table states what the formulas give for its values."""
    cfg = load_config(REPO / "configs" / preset)
    t, s = cfg.train, cfg.scale
    assert s.zero_stage == 3 and s.use_gpu and cfg.model.gradient_checkpointing and cfg.model.dtype == "bfloat16"
    assert t.max_tokens_per_batch and t.ref_max_tokens and t.eval_steps and cfg.data.eval_dataset
    p, layers, h, m = LLAMA[size]
    rows = [
        16 * p / s.num_workers,
        2 * s.zero3_max_live_parameters,
        2 * layers * h * t.max_tokens_per_batch,
        2 * t.max_tokens_per_batch * (3 * m + 6 * h),
        10 * 1024 * VOCAB,
    ]
    text = (CLUSTER / "README.md").read_text()
    column = 0 if size == "8b" else 1
    table = text.split("| per GPU, training |")[1].split("\n\n")[0].splitlines()[2:]
    stated = [float(line.strip("|").split("|")[2 + column].strip(" *")) for line in table]
    assert stated == [round(r / 1e9, 1) for r in rows] + [round(sum(rows) / 1e9, 1)], stated
    assert sum(rows) < 0.5 * 80e9  # room left on an 80 GB GPU
    reference = 2 * p / s.ref_actor_gpus
    assert reference < 0.85 * 80e9 and s.ref_actors * s.ref_actor_gpus <= s.num_workers


def test_readme_documents_each_path_with_token_auth():
    text = (CLUSTER / "README.md").read_text()
    for needle in (
        "ray up cluster/aws.yaml",
        "kubectl apply -f cluster/kuberay/raycluster.yaml",
        "rayjob-score-ref.yaml",
        "rayjob-train.yaml",
        "ray job submit",
        "ray job logs",
        "RAY_AUTH_MODE=token",
        "ray get-auth-token",
    ):
        assert needle in text, needle
    assert len(documented_commands(text)) >= 3
    assert "(cluster/README.md)" in (REPO / "README.md").read_text()


# --- two jobs on a real head ---


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@contextlib.contextmanager
def token_auth_head(root: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[dict]:
    """`ray start --head --block` on 127.0.0.1 with token auth and `args`: a token generated in a temp HOME, Ray's
    temp dir a short `/tmp/rayj*/ray` (Ray's socket paths must fit 107 bytes; RAY_TMPDIR set to its parent finds
    this head as a `ray start` on this machine), its own session; `env` adds to the head's environment. Yields
    once the head has written its address; on exit stops that session only (never a global `ray stop`)."""
    token = subprocess.run(
        [str(RAY_BIN), "get-auth-token", "--generate"],
        env={**os.environ, "HOME": str(root / "home")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert len(token) >= 32
    token_file = root / "auth_token"
    token_file.write_text(token)
    head_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    head_env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        **(env or {}),
        "PATH": f"{RAY_BIN.parent}:{head_env.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    tmpdir = Path(tempfile.mkdtemp(prefix="rayj", dir="/tmp"))
    address_file = tmpdir / "ray" / "ray_current_cluster"
    log = (root / "head.log").open("w")
    head = subprocess.Popen(
        [
            *(str(RAY_BIN), "start", "--head", "--block", "--node-ip-address=127.0.0.1"),
            *(f"--temp-dir={tmpdir / 'ray'}", "--disable-usage-stats", *args),
        ],
        env=head_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while not address_file.is_file():
            assert head.poll() is None, (root / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the head did not come up in 180 s"
            time.sleep(1)
        gcs = address_file.read_text().strip()
        yield {"gcs": gcs, "env": head_env, "token": token, "token_file": token_file, "tmpdir": tmpdir}
    finally:
        head.send_signal(signal.SIGTERM)  # --block: stops what this `ray start` started
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # anything of that session still alive
        log.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.fixture
def ray_head(tmp_path):
    """A token-auth head with the dashboard (for `ray job submit`), every port chosen free, 2 CPUs."""
    fake = {"HF_TOKEN": "hf_" + secrets.token_hex(17), "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}
    *named, lo = free_ports(10)
    while any(lo <= p <= lo + 200 for p in named):  # the workers' port range must not hold a named port
        *named, lo = free_ports(10)
    gcs, dash, client, nm, om, agent, agent_grpc, rt_agent, metrics = named
    args = [
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        f"--ray-client-server-port={client}",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={rt_agent}",
        f"--metrics-export-port={metrics}",
        f"--min-worker-port={lo}",
        f"--max-worker-port={lo + 200}",
        "--num-cpus=2",
    ]
    with token_auth_head(tmp_path, *args, env=fake) as head:
        env, address = head["env"], f"http://127.0.0.1:{dash}"
        deadline = time.time() + 180
        while (
            subprocess.run([str(RAY_BIN), "job", "list", "--address", address], env=env, capture_output=True).returncode
            != 0
        ):
            assert time.time() < deadline, "the dashboard did not come up in 180 s"
            time.sleep(2)
        yield {"address": address, "env": env, "token": head["token"], "fake": fake}


def submit(head: dict, submission_id: str, entrypoint: str) -> str:
    """`ray job submit --no-wait`, then `ray job logs --follow` until it ends; returns the logs."""
    runtime_env = {
        "excludes": [".git", ".venv/", ".cache/", "runs/", "__pycache__/", "*.egg-info/"],
        "env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"},
    }
    base = [str(RAY_BIN), "job"]
    subprocess.run(
        [
            *base,
            "submit",
            "--address",
            head["address"],
            "--submission-id",
            submission_id,
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--no-wait",
            "--",
            *shlex.split(entrypoint),
        ],
        env=head["env"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    logs = subprocess.run(
        [*base, "logs", "--address", head["address"], "--follow", submission_id],
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=480,
    ).stdout
    status = subprocess.run(
        [*base, "status", "--address", head["address"], submission_id],
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"Job '{submission_id}' succeeded" in status.stdout + status.stderr, f"{status}\n{logs[-4000:]}"
    return logs


@pytest.mark.slow
def test_two_jobs_share_the_cache_on_a_token_auth_head(ray_head, tiny_model_dir, tmp_path):
    env = ray_head["env"]
    # token auth is really on: the same request without the token is refused
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"} | {"HOME": str(tmp_path)}
    refused = subprocess.run(
        [str(RAY_BIN), "job", "list", "--address", ray_head["address"]], env=no_token, capture_output=True, text=True
    )
    assert refused.returncode != 0

    words = ["red", "blue", "green", "gold"]
    rows = [
        {"prompt": f"Colour {i}?", "chosen": f" {words[i % 4]}", "rejected": f" not {words[(i + 1) % 4]} {i}"}
        for i in range(16)
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": str(tiny_model_dir),
        "dataset": [str(tmp_path / "pairs.jsonl")],
        "cache_dir": str(tmp_path / "cache"),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_steps": 2,
        "zero_stage": 0,
        "gradient_checkpointing": False,
        "learning_rate": 1e-3,
        "ref_actors": 1,
        "num_workers": 1,
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    cfg = f"--config {tmp_path / 'job.yaml'}"

    # as cluster/README.md shows it: one job for stages 1-2 (a shell chains them), one for stage 3
    first = submit(
        ray_head, "dpo-score-ref", f'bash -c "python -m pipeline tokenize {cfg} && python -m pipeline score-ref {cfg}"'
    )
    assert "[score-ref] train: scoring 16 pairs" in first, first[-3000:]
    reference = next((tmp_path / "cache" / "reference").iterdir())
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["rows"] == 16
    before = {p.name: p.stat().st_mtime_ns for p in reference.iterdir()}

    second = submit(ray_head, "dpo-train", f"python -m pipeline train {cfg}")
    assert "[train] done: 2 steps" in second, second[-3000:]
    assert "[score-ref]" not in second and "[tokenize]" not in second  # nothing re-scored or re-tokenized
    assert {p.name: p.stat().st_mtime_ns for p in reference.iterdir()} == before
    assert len(list((tmp_path / "cache" / "reference").iterdir())) == 1
    out = tmp_path / "out"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2]
    assert (out / "final" / "model.safetensors").is_file()
    assert json.loads((out / "train_summary.json").read_text())["train_steps"] == 2

    # no token or key leaves the cluster: not in the job logs, not in any file the jobs wrote
    leaks = [ray_head["token"], *ray_head["fake"].values()]
    for text in (first, second):
        assert not any(s in text for s in leaks)
    for f in [*(tmp_path / "cache").rglob("*"), *out.rglob("*")]:
        if f.is_file():
            blob = f.read_bytes()
            assert not any(s.encode() in blob for s in leaks), f


# --- joining a cluster that refuses us ---

LOCAL_START = "a `ray start` on this machine"
PRIVATE = "or set RAY_ADDRESS=local to start a private Ray instead"
TOKEN_FIX = (
    "give it the cluster's token (`ray get-auth-token` on the head) in RAY_AUTH_TOKEN or in the file "
    f"RAY_AUTH_TOKEN_PATH names (default ~/.ray/auth_token), with RAY_AUTH_MODE=token; {PRIVATE}"
)
FAST_S = 10  # a refusal takes well under a second; Ray's own connect retries for 20 s to many minutes
DRIVER = textwrap.dedent(
    """
    import sys, time
    from pipeline.cluster import init_ray
    from pipeline.errors import ClusterError

    start = time.monotonic()
    try:
        init_ray("run")
    except ClusterError as e:
        print(f"error: {e}")
        print(f"seconds: {time.monotonic() - start:.1f}")
        sys.exit(2)
    import ray
    print("joined:", ray.get_runtime_context().gcs_address)
    """
)
# what a head writes at start and ray.init checks this process's versions against; argv: address, JSON to merge
SET_METADATA = textwrap.dedent(
    """
    import json, sys
    from ray._raylet import InnerGcsClient

    gcs = InnerGcsClient.standalone(sys.argv[1], None, 10_000)
    meta = json.loads(gcs.internal_kv_get(b"CLUSTER_METADATA", namespace=b"cluster", timeout=10))
    gcs.internal_kv_put(b"CLUSTER_METADATA", json.dumps(meta | json.loads(sys.argv[2])).encode(), True, b"cluster",
                        timeout=10)
    """
)


@pytest.fixture(scope="module")
def auth_head(tmp_path_factory):
    """A cheap token-auth head (no CPUs, no dashboard) for the tests of joining it."""
    with token_auth_head(tmp_path_factory.mktemp("auth-head"), f"--port={free_ports(1)[0]}", "--num-cpus=0",
                         "--include-dashboard=false") as head:  # fmt: skip
        yield head


def driver_env(ray_tmpdir: Path, home: Path, **env: str) -> dict[str, str]:
    """This environment without a Ray address or token; Ray's temp root `ray_tmpdir` (where a `ray start` on this
    machine leaves its address), HOME `home` (where Ray looks for .ray/auth_token), then `env`."""
    ours = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    return ours | {"RAY_TMPDIR": str(ray_tmpdir), "HOME": str(home)} | env


def drive(env: dict[str, str]) -> tuple[int, list[str]]:
    """init_ray("run") in a fresh driver: its exit status (2: ClusterError) and stdout lines. A driver that waits
    on Ray's connect retries fails here by the timeout; any other exception, by its traceback."""
    done = subprocess.run([sys.executable, "-c", DRIVER], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.returncode, done.stdout.splitlines()


def refused(env: dict[str, str], within: float = FAST_S) -> list[str]:
    """The lines of a driver that the cluster refuses, which must take under `within` seconds."""
    rc, lines = drive(env)
    assert rc == 2 and lines[-1].startswith("seconds: "), lines
    assert float(lines[-1].split()[1]) < within, lines
    return lines[:-1]


def test_which_cluster_a_command_joins(monkeypatch, tmp_path):
    from pipeline.cluster import cluster_to_join
    from pipeline.errors import ClusterError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert cluster_to_join() is None  # no `ray start` here: a private local Ray, and no line on the console
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.1.2.3:6379")
    assert cluster_to_join() == ("10.1.2.3:6379", LOCAL_START)
    for named, joined in [("local", None), ("10.0.0.1:6379", ("10.0.0.1:6379", "RAY_ADDRESS")),
                          ("ray://10.0.0.1:10001", ("ray://10.0.0.1:10001", "RAY_ADDRESS"))]:  # fmt: skip
        monkeypatch.setenv("RAY_ADDRESS", named)
        assert cluster_to_join() == joined, named
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # `ray job submit`'s address, as cluster/README exports
    with pytest.raises(ClusterError, match=r"^RAY_ADDRESS=http://127.0.0.1:8265 is a dashboard address"):
        cluster_to_join()
    monkeypatch.setenv("RAY_ADDRESS", "head-node")
    with pytest.raises(ClusterError, match=r"^RAY_ADDRESS=head-node: Invalid address format: head-node; set it to"):
        cluster_to_join()


@pytest.mark.parametrize("how", ["found here, no token", "RAY_ADDRESS, a wrong token"])
def test_a_head_that_refuses_our_token_fails_in_seconds_naming_the_fix(auth_head, tmp_path, how):
    gcs = auth_head["gcs"]
    if how == "found here, no token":  # the user's case: a `ray start --head` here, nothing in the environment
        env = driver_env(auth_head["tmpdir"], tmp_path)
        why, cause = LOCAL_START, "this process, which sends no token"
    else:
        env = driver_env(
            tmp_path, tmp_path, RAY_ADDRESS=gcs, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16)
        )
        why, cause = "RAY_ADDRESS", "the token this process sends (RAY_AUTH_TOKEN)"
    assert refused(env) == [
        f"[run] joining the Ray cluster at {gcs} ({why})",
        f"error: the Ray cluster at {gcs} ({why}) refuses {cause}: {TOKEN_FIX}",
    ]


@pytest.mark.parametrize("how", ["RAY_ADDRESS and RAY_AUTH_TOKEN_PATH", "found here, ~/.ray/auth_token"])
def test_with_its_token_a_driver_joins_and_says_where(auth_head, tmp_path, how):
    gcs = auth_head["gcs"]
    if how == "RAY_ADDRESS and RAY_AUTH_TOKEN_PATH":
        env = driver_env(tmp_path, tmp_path, RAY_ADDRESS=gcs, RAY_AUTH_MODE="token",
                         RAY_AUTH_TOKEN_PATH=str(auth_head["token_file"]))  # fmt: skip
        why = "RAY_ADDRESS"
    else:  # no RAY_AUTH_MODE: for a cluster it finds, Ray sends the token it finds in ~/.ray
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text(auth_head["token"])
        env = driver_env(auth_head["tmpdir"], tmp_path)
        why = LOCAL_START
    assert drive(env) == (0, [f"[run] joining the Ray cluster at {gcs} ({why})", f"joined: {gcs}"])


def test_a_head_of_another_ray_version_fails_in_seconds(auth_head, tmp_path):
    """A head of Ray 2.59.0, as its cluster metadata says (what ray.init compares this process's versions with)."""
    gcs, head_env = auth_head["gcs"], auth_head["env"]
    py = ".".join(map(str, sys.version_info[:3]))
    env = driver_env(tmp_path, tmp_path, RAY_ADDRESS=gcs, RAY_AUTH_MODE="token",
                     RAY_AUTH_TOKEN_PATH=str(auth_head["token_file"]))  # fmt: skip
    set_metadata = [sys.executable, "-c", SET_METADATA, gcs]
    subprocess.run([*set_metadata, '{"ray_version": "2.59.0"}'], env=head_env, check=True, timeout=60)
    try:
        assert refused(env) == [
            f"[run] joining the Ray cluster at {gcs} (RAY_ADDRESS)",
            f"error: the Ray cluster at {gcs} (RAY_ADDRESS) runs Ray 2.59.0 on Python {py} and this process Ray "
            f"{ray.__version__} on Python {py}; Ray needs the same on both: run this command with the cluster's "
            f"versions, or the cluster with ours (cluster/README.md, Image), {PRIVATE}",
        ]
    finally:
        subprocess.run([*set_metadata, json.dumps({"ray_version": ray.__version__})], env=head_env, check=True,
                       timeout=60)  # fmt: skip


@pytest.mark.parametrize("how", ["RAY_ADDRESS", "a `ray start` here that is gone"])
def test_an_address_where_nothing_listens_fails_in_seconds(tmp_path, how):
    port = free_ports(1)[0]
    if how == "RAY_ADDRESS":
        env = driver_env(tmp_path, tmp_path, RAY_ADDRESS=f"127.0.0.1:{port}")
        why, fix = "RAY_ADDRESS", "check the address (the head's GCS port)"
    else:  # its address file outlived it (a crash; `ray stop` removes it)
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
        env = driver_env(tmp_path, tmp_path)
        why, fix = LOCAL_START, "run `ray stop` to forget it"
    joining, error = refused(env)
    address = re.fullmatch(rf"\[run\] joining the Ray cluster at (\S+:{port}) \({re.escape(why)}\)", joining)
    assert address, joining  # the host is Ray's: 127.0.0.1 becomes this machine's address
    assert error == f"error: nothing answers at {address[1]} ({why}): Connection refused; {fix}, {PRIVATE}"


def test_an_address_where_something_else_listens_fails_in_seconds(tmp_path):
    """An HTTP server (as the dashboard's port given without http://): Ray's first connect gives up after about
    10 s plus our 5 s; its own retries would take minutes."""
    # all interfaces: Ray dials this machine's address for 127.0.0.1
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        joining, error = refused(driver_env(tmp_path, tmp_path, RAY_ADDRESS=f"127.0.0.1:{port}"), within=60)
    finally:
        server.shutdown()
    address = joining.removeprefix("[run] joining the Ray cluster at ").removesuffix(" (RAY_ADDRESS)")
    assert address.endswith(f":{port}"), joining
    assert error == (
        f"error: the Ray cluster at {address} (RAY_ADDRESS) does not answer as a Ray head (Timed out while waiting for "
        f"GCS to become available.); check the address, {PRIVATE}"
    )
