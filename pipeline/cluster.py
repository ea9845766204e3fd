"""The Ray cluster as the stages see it: joining or starting it, the CPUs each worker or actor gets, and how
errors of ours come back from Ray Data tasks and actors."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import ray
from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
from ray._private.services import canonicalize_bootstrap_address, parse_address
from ray._private.utils import check_version_info, compute_version_info
from ray._raylet import (  # type: ignore[attr-defined]  # the stubs declare only the ids and ObjectRef
    AuthenticationMode,
    AuthenticationTokenLoader,
    InnerGcsClient,
    get_authentication_mode,
)
from ray.exceptions import AuthenticationError, RayError

from pipeline.errors import ClusterError, PipelineError

# --- joining or starting ---

CONNECT_TIMEOUT_S = 5  # for the TCP connection to the head's GCS port
GCS_TIMEOUT_MS = 5_000  # for the GCS's first answers once connected (Ray adds its own 5 s connect wait)
LOCAL_START = "a `ray start` on this machine"  # why ray.init joins a cluster RAY_ADDRESS does not name
PRIVATE = "or set RAY_ADDRESS=local to start a private Ray instead"
TOKEN_FIX = (
    "give it the cluster's token (`ray get-auth-token` on the head) in RAY_AUTH_TOKEN or in the file "
    "RAY_AUTH_TOKEN_PATH names (default ~/.ray/auth_token), with RAY_AUTH_MODE=token"
)
# A private Ray keeps idle worker processes for a minute (Ray's default: 1 s once there are more than its CPUs).
# Each stage runs several short Ray Data executions (read, map, sort, write) whose tasks would otherwise land on
# fresh processes, each paying 2-4 s to start and import the stack again.
IDLE_WORKER_KEEP_MS = 60_000


def init_ray(command: str = "ray") -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`) or, by Ray's own rule, the one a
    `ray start` on this machine runs, saying which as `[command] joining the Ray cluster at ...`; else start a
    private local Ray, quietly. A cluster that would refuse this driver fails in seconds with a ClusterError that
    names the cause and the fix, where ray.init would retry for 20 s to many minutes and raise a traceback."""
    if ray.is_initialized():
        return
    joining = cluster_to_join()
    if joining is not None:
        address, why = joining
        print(f"[{command}] joining the Ray cluster at {address} ({why})", flush=True)
        if "://" not in address:  # ray://: Ray Client, reached through its own server
            check_admits_us(address, why)
    ray.init(
        address=os.environ.get("RAY_ADDRESS") or None,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
        # a cluster we join keeps the settings it was started with
        _system_config=None if joining else {"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS},
    )


def cluster_to_join() -> tuple[str, str] | None:
    """(address, why) of the cluster ray.init will join: RAY_ADDRESS, else the address the last `ray start` on
    this machine left in Ray's temp dir; None when it will start its own (none, or RAY_ADDRESS=local)."""
    named = os.environ.get("RAY_ADDRESS") or None
    if named is not None and named.startswith(("http://", "https://")):
        raise ClusterError(
            f"RAY_ADDRESS={named} is a dashboard address, the one `ray job submit` takes; a driver joins the head's "
            f"GCS address (HEAD:6379, which `ray job submit` gives the job's driver): submit the command with "
            f"`ray job submit ... -- dpo-pipeline ...`, {PRIVATE}"
        )
    if named is not None and "://" in named:
        return named, "RAY_ADDRESS"
    try:
        address = canonicalize_bootstrap_address(named)  # type: ignore[arg-type]  # None: Ray's own search
    except (ValueError, ConnectionError) as e:  # not host:port; `auto` with no Ray running here
        raise ClusterError(f"RAY_ADDRESS={named}: {e}; set it to the head's HOST:PORT, {PRIVATE}") from e
    if address is None:
        return None
    return address, LOCAL_START if named in (None, "auto") else "RAY_ADDRESS"


def check_admits_us(address: str, why: str) -> None:
    """Raise ClusterError, within seconds, when the cluster at `address` would not take this driver: nothing
    answers there, its GCS refuses our token (or our lack of one), or it runs another Ray or Python."""
    host, port = parse_address(address)
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        fix = "run `ray stop` to forget it" if why == LOCAL_START else "check the address (the head's GCS port)"
        raise ClusterError(f"nothing answers at {address} ({why}): {e.strerror or e}; {fix}, {PRIVATE}") from e
    if os.environ.get("RAY_ADDRESS") in (None, "", "auto"):
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)  # as ray.init does for a cluster it finds
    where = f"the Ray cluster at {address} ({why})"
    try:
        gcs = InnerGcsClient.standalone(address, None, GCS_TIMEOUT_MS)
        metadata = gcs.internal_kv_get(b"CLUSTER_METADATA", namespace=b"cluster", timeout=GCS_TIMEOUT_MS / 1000)
    except AuthenticationError as e:
        raise ClusterError(f"{where} refuses {_our_token()}: {TOKEN_FIX}; {PRIVATE}") from e
    except RayError as e:
        raise ClusterError(f"{where} does not answer as a Ray head ({e}); check the address, {PRIVATE}") from e
    if metadata:  # what the head wrote at start: the versions ray.init checks ours against
        cluster = json.loads(metadata)
        try:
            check_version_info(cluster, "this driver")
        except RuntimeError as e:
            ours = compute_version_info()
            raise ClusterError(
                f"{where} runs Ray {cluster['ray_version']} on Python {cluster['python_version']} and this process "
                f"Ray {ours[0]} on Python {ours[1]}; Ray needs the same on both: run this command with the "
                f"cluster's versions, or the cluster with ours (cluster/README.md, Image), {PRIVATE}"
            ) from e


def _our_token() -> str:
    """What this process sends the GCS: no token, or a token and where it came from."""
    if get_authentication_mode() != AuthenticationMode.TOKEN or not AuthenticationTokenLoader.instance().has_token():
        return "this process, which sends no token"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the token this process sends (RAY_AUTH_TOKEN)"
    return f"the token this process sends (from {os.environ.get('RAY_AUTH_TOKEN_PATH') or '~/.ray/auth_token'})"


# --- resources and errors ---


def cluster_cpus() -> int:
    """CPUs in the whole cluster (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cpus_each(configured: int | None, count: int) -> int:
    """CPUs (and torch threads) for each of `count` workers or actors: the configured number, else an equal
    share of the cluster's CPUs."""
    return configured or max(1, cluster_cpus() // count)


def data_context() -> ray.data.DataContext:
    """This driver's Ray Data context, set so that an error raised in a map function comes back as itself
    (RayTaskError(DataError), ...) rather than as Ray Data's UserCodeException, which keeps no cause."""
    ctx = ray.data.DataContext.get_current()
    ctx.raise_original_map_exception = True
    return ctx


class SetupErrorsOnFirstCall:
    """Base for Ray Data actor classes: an error of ours raised while the actor sets up (a model that fails to
    load) is kept and raised by the first call. Raised in `__init__`, Ray would report only the text of it
    (ActorDiedError keeps no cause), and the console would show a traceback instead of our message.

        class _Score(SetupErrorsOnFirstCall):
            def setup(self, model_dir: str) -> None: ...      # instead of __init__
            def process(self, batch): ...                     # instead of __call__
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self.setup_error: PipelineError | None = None
        try:
            self.setup(*args, **kwargs)
        except PipelineError as e:
            self.setup_error = e

    def __call__(self, batch: Any) -> Any:
        if self.setup_error is not None:
            raise self.setup_error
        return self.process(batch)

    def setup(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def process(self, batch: Any) -> Any:
        raise NotImplementedError
