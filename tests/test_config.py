"""Config: TRL defaults, validation messages that name the key, YAML + command-line overrides."""

from __future__ import annotations

import pytest

from pipeline.config import Config, config_from_dict, load_config
from pipeline.errors import ConfigError
from stages.cli import build_parser, main, parse_config


def test_trl_defaults():
    cfg = Config()
    assert cfg.loss.beta == 0.1
    assert cfg.loss.loss_type == ("sigmoid",)
    assert cfg.loss.weights == (1.0,)
    assert cfg.data.max_length == 1024
    assert cfg.data.truncation_mode == "keep_start"
    assert cfg.train.learning_rate == 1e-6
    assert cfg.train.logging_steps == 10
    assert cfg.train.per_device_train_batch_size == 8
    assert cfg.train.num_train_epochs == 3.0
    assert cfg.model.gradient_checkpointing is True
    assert (cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_dropout) == (16, 32, 0.05)
    assert cfg.train.ref_batch_size == 8


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"betta": 0.2}, "unknown key(s) 'betta' (did you mean 'beta'?)"),
        ({"beta": "high"}, "beta='high' is not a number"),
        ({"beta": 0}, "beta=0.0 is not allowed: expected a finite number > 0"),
        ({"loss_type": "sigmoid,nope"}, "loss_type='nope' is not allowed"),
        ({"loss_type": "sigmoid,sft", "loss_weights": "1.0"}, "expected 2 weight(s)"),
        ({"truncation_mode": "middle"}, "truncation_mode='middle' is not one of keep_start, keep_end"),
        ({"max_length": 1}, "max_length=1 is not allowed"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size=0 is not allowed"),
        ({"use_peft": "maybe"}, "use_peft='maybe' is not true/false"),
        ({"zero_stage": 4}, "zero_stage=4 is not one of 0, 1, 2, 3"),
        ({"offload_param": True, "zero_stage": 2}, "offload_param=True is not allowed: expected false unless"),
        ({"dtype": "float32", "bf16": True}, "bf16=True contradicts dtype=float32"),
        ({"ld_alpha": 1.5}, "ld_alpha=1.5 is not allowed"),
        ({"num_workers": 0}, "num_workers=0 is not allowed"),
    ],
)
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(values)
    assert message in str(e.value)


def test_command_line_overrides_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0.3\nloss_type: [sigmoid, sft]\nloss_weights: [0.5, 0.5]\nmax_length: null\n")
    args = build_parser().parse_args(
        ["train", "--config", str(path), "--beta", "0.2", "--loss_weights", "0.8,0.2", "--use_peft", "true"]
    )
    cfg = parse_config(args)
    assert cfg.loss.beta == 0.2
    assert cfg.loss.loss_type == ("sigmoid", "sft")
    assert cfg.loss.loss_weights == (0.8, 0.2)
    assert cfg.data.max_length is None
    assert cfg.model.use_peft is True


def test_yaml_problems_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    seq = tmp_path / "seq.yaml"
    seq.write_text("- beta\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(seq)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_replace_and_flat_round_trip():
    cfg = Config().replace(beta=0.5, loss_type=["ipo"])
    assert cfg.loss.beta == 0.5 and cfg.loss.loss_type == ("ipo",)
    assert config_from_dict(cfg.flat()) == cfg


def test_resolved_dtype():
    assert Config().compute_dtype == "float32"
    assert config_from_dict({"use_gpu": True}).compute_dtype == "bfloat16"
    assert config_from_dict({"bf16": False, "use_gpu": True}).compute_dtype == "float32"


def test_cli_prints_error_without_traceback(capsys):
    assert main(["tokenize", "--beta", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "beta=-1.0 is not allowed" in err and "Traceback" not in err


def test_help_lists_every_key_with_its_doc(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("--beta", "--loss_type", "--zero_stage", "--ref_actors", "--max_length", "--lora_r"):
        assert key in out
    assert "Deviation from the reference" in out


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"output_dir": "runs/x", "cache_dir": "~/c", "storage_path": "s3://bucket/r"})
    out = cfg.with_absolute_paths()
    assert out.data.output_dir == str(tmp_path / "runs" / "x")
    assert out.data.cache_dir.startswith("/") and out.scale.storage_path == "s3://bucket/r"


def test_trl_key_names_are_read_as_ours_and_said_once(tmp_path, capsys):
    path = tmp_path / "trl.yaml"
    path.write_text(
        "model_name_or_path: m\ntorch_dtype: float32\ndataset_name: trl-lib/ultrafeedback_binarized\n"
        "dataset_test_split: test\nbeta: 0.2\n"
    )
    cfg = load_config(path)
    assert (cfg.model.model, cfg.model.dtype, cfg.loss.beta) == ("m", "float32", 0.2)
    assert cfg.data.dataset == ("trl-lib/ultrafeedback_binarized:train",)  # TRL's default train split
    assert cfg.data.eval_dataset == ("trl-lib/ultrafeedback_binarized:test",)
    assert capsys.readouterr().out == (
        "[config] TRL's key names read as ours: model_name_or_path -> model; torch_dtype -> dtype; dataset_name -> "
        "dataset = trl-lib/ultrafeedback_binarized:train; dataset_name + dataset_test_split -> eval_dataset = "
        "trl-lib/ultrafeedback_binarized:test\n"
    )
    assert cfg.replace(beta=0.3).loss.beta == 0.3 and capsys.readouterr().out == ""  # our names from here on

    flags = ["train", "--model_name_or_path", "m", "--dataset_name", "org/x", "--dataset_train_split", "train_prefs"]
    cfg = parse_config(build_parser().parse_args(flags))
    assert (cfg.model.model, cfg.data.dataset, cfg.data.eval_dataset) == ("m", ("org/x:train_prefs",), ())
    assert "dataset_name + dataset_train_split -> dataset = org/x:train_prefs" in capsys.readouterr().out

    assert config_from_dict({"model_name_or_path": "m", "model": "m"}).model.model == "m"  # the same value: fine
    with pytest.raises(ConfigError, match=r"model_name_or_path \(TRL's name\) gives model = 'a', but model = 'b'"):
        config_from_dict({"model_name_or_path": "a", "model": "b"})
    with pytest.raises(ConfigError, match=r"dataset_test_split name\(s\) a split of dataset_name .* OWNER/NAME:SPLIT"):
        config_from_dict({"dataset_test_split": "test"})
    with pytest.raises(ConfigError, match=r"dataset_name \(TRL's name\) gives dataset = \['org/x:train'\], but"):
        config_from_dict({"dataset_name": "org/x", "dataset": ["local.jsonl"]})
