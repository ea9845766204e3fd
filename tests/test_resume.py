"""The resume check (pipeline.train.resume) on hand-made checkpoint directories: what is refused, what is allowed and
said, the changed data behind an unchanged path, --restart, and runs with nothing to compare."""

from __future__ import annotations

import json

import pytest

from pipeline.config import config_from_dict
from pipeline.errors import ConfigError
from pipeline.train.resume import check_resume, run_settings
from pipeline.train.train_state import STATE_FILE

BASE = {"dataset": "pairs.jsonl", "beta": 0.1, "max_steps": 4}


def checkpoint(run_dir, name: str, settings: dict) -> None:
    (run_dir / name).mkdir(parents=True)
    (run_dir / name / STATE_FILE).write_text(json.dumps({"step": 2, "config": settings}))


def test_trajectory_changes_are_refused_with_every_key(tmp_path):
    checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-00.000000", run_settings(config_from_dict(BASE), "t1"))
    new = run_settings(config_from_dict({**BASE, "beta": 0.5, "learning_rate": 1e-5}), "t1")
    with pytest.raises(ConfigError) as e:
        check_resume(new, tmp_path, restart=False)
    text = str(e.value)
    assert "  beta: 0.1 -> 0.5\n  learning_rate: 1e-06 -> 1e-05\n" in text and "--restart" in text
    assert "run_name" in text  # the other way out


def test_changed_data_under_the_same_path_is_refused(tmp_path):
    checkpoint(tmp_path, "checkpoint_a", run_settings(config_from_dict(BASE), "old-table"))
    with pytest.raises(ConfigError, match="train_table: 'old-table' -> 'new-table'\n  \\(the training data"):
        check_resume(run_settings(config_from_dict(BASE), "new-table"), tmp_path, restart=False)


def test_logging_changes_resume_and_are_said(tmp_path, capsys):
    checkpoint(tmp_path, "checkpoint_a", run_settings(config_from_dict(BASE), "t"))
    checkpoint(tmp_path, "checkpoint_b", run_settings(config_from_dict({**BASE, "beta": 0.3}), "t"))  # newest
    check_resume(run_settings(config_from_dict({**BASE, "beta": 0.3, "logging_steps": 5}), "t"), tmp_path, False)
    assert "changed settings that do not alter the run: logging_steps 10 -> 5" in capsys.readouterr().out


def test_restart_removes_the_checkpoints_and_nothing_to_compare_passes(tmp_path):
    checkpoint(tmp_path, "checkpoint_a", run_settings(config_from_dict(BASE), "t"))
    check_resume(run_settings(config_from_dict({**BASE, "beta": 0.9}), "t"), tmp_path, restart=True)
    assert not tmp_path.exists()
    check_resume(run_settings(config_from_dict(BASE), "t"), tmp_path, restart=False)  # no run yet: nothing to check


def test_a_key_newer_than_the_checkpoint_counts_as_its_default(tmp_path):
    """A checkpoint written before a key existed (e.g. cpo_alpha, added with the reference-free losses) resumes
    when the key keeps its default, and is refused when it does not."""
    old = {k: v for k, v in run_settings(config_from_dict(BASE), "t").items() if k != "cpo_alpha"}
    checkpoint(tmp_path, "checkpoint_a", old)
    check_resume(run_settings(config_from_dict(BASE), "t"), tmp_path, restart=False)
    with pytest.raises(ConfigError, match=r"  cpo_alpha: 1\.0 -> 0\.0\n"):
        check_resume(run_settings(config_from_dict({**BASE, "cpo_alpha": 0.0}), "t"), tmp_path, restart=False)


def test_a_key_the_config_no_longer_has_is_refused_with_its_name(tmp_path):
    """A checkpoint that records a setting the config has since lost (here a made-up `sft_weight`) cannot say
    whether the code still does what its value did: refused like a changed key."""
    checkpoint(tmp_path, "checkpoint_a", {**run_settings(config_from_dict(BASE), "t"), "sft_weight": 0.5})
    with pytest.raises(ConfigError, match=r"\n  sft_weight: 0\.5 -> \(no longer a setting\)\n"):
        check_resume(run_settings(config_from_dict(BASE), "t"), tmp_path, restart=False)


def test_a_rank_reads_the_shared_checkpoint_files_and_its_own_partitions_only():
    from pipeline.train.checkpoint_files import rank_needs

    shared = ["mp_rank_00_model_states.pt", "state.json", "latest", ".metadata.json"]
    own = {
        0: ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"],
        1: ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"],
        12: ["zero_pp_rank_12_mp_rank_00_optim_states.pt"],
    }
    for rank in own:
        wanted = {n for names in own.values() for n in names if rank_needs(n, rank)}
        assert wanted == set(own[rank]), rank  # rank 1 does not take rank 12's file, nor 12 rank 1's
        assert all(rank_needs(n, rank) for n in shared)
