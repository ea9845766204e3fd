"""Fault injection for the fault-tolerance tests (contributors: see README, "Testing failures").

    DPO_PIPELINE_FAULT=kill:3:/tmp/marker dpo-pipeline train ...   # SIGKILL rank 0 right after step 3, once
    DPO_PIPELINE_FAULT=raise:3:/tmp/marker dpo-pipeline train ...  # raise there instead

The driver reads the variable (`Fault.from_env`) and hands the fault to the workers as their `after_step`
callback; the training loop itself knows only that callback. The marker file records that the fault
happened, so a restarted or resumed run goes on.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

FAULT_ENV = "DPO_PIPELINE_FAULT"
# Ray Train's controller collects a worker's reports when it polls the group, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
# (2 s by default): a worker killed before that poll loses the checkpoint it had just reported, and the group
# restarts from the one before (or from scratch). A kill waits out two polls first, so that the restart resumes
# from the latest checkpoint, which is what the tests check.
KILL_AFTER_S = 5.0


@dataclass(frozen=True)
class Fault:
    kind: str  # "kill" or "raise"
    step: int
    marker: str

    @classmethod
    def from_env(cls) -> Fault | None:
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return None
        kind, step, marker = spec.split(":", 2)
        if kind not in ("kill", "raise"):
            raise ValueError(f"{FAULT_ENV}={spec}: expected kill|raise:<step>:<marker file>")
        return cls(kind, int(step), marker)

    def __call__(self, step: int, rank: int) -> None:
        if rank != 0 or step != self.step or Path(self.marker).exists():
            return
        Path(self.marker).touch()
        if self.kind == "kill":
            time.sleep(KILL_AFTER_S)
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"{FAULT_ENV}: injected failure after step {step}")
