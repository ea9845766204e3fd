"""The README documents every config key and the two commands."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import config_fields

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_config_key_is_documented():
    missing = [k for k in config_fields() if f"| `{k}` |" not in README]
    assert not missing, f"README lacks rows for: {missing}"


def test_quickstart_commands():
    assert "make demo" in README and "make test" in README
