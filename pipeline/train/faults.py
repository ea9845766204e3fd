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
# (2 s by default; the tests poll every 0.5 s): a worker killed before that poll loses the checkpoint it had just
# reported, and the group restarts from the one before (or from scratch). A kill waits out two polls and a half
# first, so that the restart resumes from the latest checkpoint, which is what the tests check. The interval is
# read on the driver, whose environment Ray Train gives its controller.
POLLS_BEFORE_KILL = 2.5


@dataclass(frozen=True)
class Fault:
    kind: str  # "kill" or "raise"
    step: int
    marker: str
    kill_after_s: float  # the poll interval the run's controller uses, POLLS_BEFORE_KILL times

    @classmethod
    def from_env(cls) -> Fault | None:
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return None
        kind, step, marker = spec.split(":", 2)
        if kind not in ("kill", "raise"):
            raise ValueError(f"{FAULT_ENV}={spec}: expected kill|raise:<step>:<marker file>")
        poll_s = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))
        return cls(kind, int(step), marker, POLLS_BEFORE_KILL * poll_s)

    def __call__(self, step: int, rank: int) -> None:
        if rank != 0 or step != self.step or Path(self.marker).exists():
            return
        Path(self.marker).touch()
        if self.kind == "kill":
            time.sleep(self.kill_after_s)
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"{FAULT_ENV}: injected failure after step {step}")
