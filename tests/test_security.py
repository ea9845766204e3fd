"""Security: no token, credential or cloud key in what the pipeline prints or writes (pipeline/redact.py); no
remote code and no pickled weights unless the user opts in."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from pipeline.redact import MASK, RedactingStream, is_secret_name, redact, redact_value
from stages.cli import main

HF = "hf_" + "aB3" * 12
AWS_ID = "AKIA" + "Q" * 16
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def test_patterns_and_environment_values():
    env = {
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "RAY_AUTH_TOKEN": "0123456789abcdef",
        "MY_PASSWORD": "hunter2hunter2",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_TOKEN": "short",
        "PATH": "/usr/bin:/bin",
    }
    text = (
        f"token {HF} id {AWS_ID} secret {AWS_SECRET} ray 0123456789abcdef pw hunter2hunter2 "
        f"uri s3://{AWS_ID}:{AWS_SECRET}@bucket/key plain s3://bucket/a:b@c path /usr/bin:/bin false short"
    )
    out = redact(text, env)
    for secret in (HF, AWS_ID, AWS_SECRET, "0123456789abcdef", "hunter2hunter2"):
        assert secret not in out
    assert f"uri s3://{MASK}@bucket/key" in out
    # ordinary text stays: non-secret names, values too short to be secrets, '@' in a path, not credentials
    assert "plain s3://bucket/a:b@c path /usr/bin:/bin false short" in out
    key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----"
    assert redact(f"k {key} end", {}) == f"k {MASK} end"


def test_secret_names():
    assert all(
        map(
            is_secret_name,
            [
                "HF_TOKEN",
                "RAY_AUTH_TOKEN",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_ACCESS_KEY_ID",
                "WANDB_API_KEY",
                "DB_PASSWORD",
                "GOOGLE_APPLICATION_CREDENTIALS",
            ],
        )
    )
    assert not any(map(is_secret_name, ["TOKENIZERS_PARALLELISM", "RAY_AUTH_MODE", "PATH", "KEYBOARD"]))


def test_nested_values_and_split_writes(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF)
    assert redact_value({"a": [f"x{HF}", 3, (HF,)], "b": None}) == {"a": [f"x{MASK}", 3, (MASK,)], "b": None}
    sink = io.StringIO()
    stream = RedactingStream(sink)
    stream.write(f"line with {HF[:10]}")  # a secret split over two writes of one line
    stream.write(f"{HF[10:]} end\nnext ")
    stream.write("line")
    stream.flush()
    assert sink.getvalue() == f"line with {MASK} end\nnext line"


def test_cli_output_never_shows_secrets(ray_session, tmp_path, monkeypatch, capsys):
    """A secret from the environment inside an error message, and credentials in a URI: exit 2, a clear
    message, and neither secret in anything printed."""
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"output_dir": f"s3://{AWS_ID}:{AWS_SECRET}@bucket/out"}))
    assert main(["tokenize", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "output_dir: a URI must not contain credentials" in err
    assert AWS_SECRET not in err and AWS_ID not in err

    cfg.write_text(
        json.dumps(
            {
                "cache_dir": str(tmp_path / "cache"),
                "output_dir": str(tmp_path / "out"),
                "dataset": [str(tmp_path / f"data-{HF}.jsonl")],
            }
        )
    )
    assert main(["tokenize", "--config", str(cfg), "--model", str(tmp_path / f"no-model-{HF}")]) == 2
    captured = capsys.readouterr()
    assert "error: model" in captured.err and f"no-model-{MASK}" in captured.err
    assert HF not in captured.out + captured.err


# --- model loading: no remote code and no pickle unless the user opts in ---


def test_defaults_are_off():
    from pipeline.config import ModelConfig

    assert ModelConfig().trust_remote_code is False and ModelConfig().allow_pickle_weights is False


def test_pickle_weights_load_only_when_allowed(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.errors import PipelineError
    from pipeline.models.loading import load_causal_lm

    pickled = tmp_path / "pickled"  # the same weights as a pickled state dict (the pre-safetensors format)
    pickled.mkdir()
    shutil.copy(tiny_model_dir / "config.json", pickled)
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(), pickled / "pytorch_model.bin")
    assert (pickled / "pytorch_model.bin").is_file() and not list(pickled.glob("*.safetensors"))
    with pytest.raises(PipelineError, match=r"only safetensors weights load unless allow_pickle_weights: true"):
        load_causal_lm(str(pickled))
    model = load_causal_lm(str(pickled), allow_pickle_weights=True)
    want = load_causal_lm(str(tiny_model_dir))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), want.parameters()))


def test_remote_code_never_runs_unless_trusted(tiny_model_dir, tmp_path):
    """A model directory that ships its own Python (auto_map): the model is refused with a message naming the
    setting, and none of the shipped code ever runs (it would leave a marker file)."""
    from pipeline.errors import PipelineError
    from pipeline.models.loading import load_causal_lm, load_tokenizer

    repo = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, repo)
    marker = tmp_path / "EXECUTED"
    code = f"from pathlib import Path\nPath({str(marker)!r}).touch()\nfrom transformers import LlamaConfig\n"
    files = {
        "configuration_custom.py": ("LlamaConfig", "class CustomConfig(LlamaConfig):\n    model_type = 'x'"),
        "modeling_custom.py": ("LlamaForCausalLM", "class CustomModel(LlamaForCausalLM):\n    pass"),
        "tokenization_custom.py": (
            "PreTrainedTokenizerFast",
            "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass",
        ),
    }
    for name, (base, body) in files.items():
        (repo / name).write_text(code.replace("LlamaConfig", base) + body + "\n")
    config = json.loads((repo / "config.json").read_text())
    config |= {
        "model_type": "x",
        "auto_map": {
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomModel",
        },
    }
    (repo / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((repo / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}
    (repo / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(PipelineError, match="trust_remote_code"):
        load_causal_lm(str(repo))
    # the tokenizer names a built-in class (tokenizer_class) besides its auto_map: transformers loads that one
    assert "CustomTokenizer" not in type(load_tokenizer(str(repo))).__name__
    assert not marker.exists()
