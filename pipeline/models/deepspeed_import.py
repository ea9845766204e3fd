"""DeepSpeed imported without MLflow. DeepSpeed's runtime config imports its autotuner, which imports MLflow
whenever it is installed (it is, for `report_to: mlflow`) to log autotuning trials the pipeline never runs: 1.4 s
of CPU in every process that imports DeepSpeed (each training worker), more than DeepSpeed's own import.

    deepspeed = import_deepspeed()
"""

from __future__ import annotations

import sys
from types import ModuleType


def import_deepspeed() -> ModuleType:
    """The deepspeed module. Its first import in a process sees no MLflow (unless MLflow is imported already): the
    autotuner records it as absent. A later `import mlflow`, by the run's MLflow logger, finds it as usual."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError meanwhile
        try:
            import deepspeed
        finally:
            del sys.modules["mlflow"]
    import deepspeed

    module: ModuleType = deepspeed  # no stubs: typed here as what it is
    return module
