"""`python -m pipeline ...` is `dpo-pipeline ...`. The command line sits on top of the stages (stages/cli.py),
so the library runs it as a program, not as an import: dependencies stay one way, stages -> pipeline."""

import runpy

runpy.run_module("stages.cli", run_name="__main__", alter_sys=True)
