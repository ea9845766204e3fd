"""The README's worked examples are real: every `dpo-pipeline` command line in a bash block parses with this
CLI and its flags make a valid config, and every YAML config file shown (a block opening `# NAME.yaml`) loads."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.config import config_from_dict
from stages.cli import build_parser, parse_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def command_lines() -> list[str]:
    """`dpo-pipeline …` invocations, continuation lines joined, comments and shell loop variables resolved."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip().replace("$beta", "0.2")
            if "dpo-pipeline " in line and not line.startswith("#"):
                out.append(line[line.index("dpo-pipeline ") :].rstrip("; "))
    return out


def test_the_readme_has_the_worked_examples():
    commands = command_lines()
    assert "dpo-pipeline report RUN_DIR" in README
    for needed in ("--use_peft true", "--loss_type sigmoid,sft", "--beta 0.2", "--dataset builtin:demo-train:320"):
        assert any(needed in c for c in commands), needed
    assert "ray job submit" in README and "RAY_AUTH_MODE=token" in README and "ray get-auth-token --generate" in README


@pytest.mark.parametrize("line", command_lines())
def test_command_parses_into_a_valid_config(line):
    argv = shlex.split(line)[1:]
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return
    config = getattr(args, "config", None)
    if config is not None and not (ROOT / config).is_file():
        args.config = None  # a file the example asks the reader to write; its flags are still checked
    elif config is not None:
        args.config = str(ROOT / config)
    parse_config(args)


@pytest.mark.parametrize("block", [b for b in blocks("yaml") if re.match(r"# \S+\.yaml\n", b)])
def test_yaml_example_is_a_valid_config(block):
    config_from_dict(yaml.safe_load(block))
