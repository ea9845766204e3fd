"""The one typed configuration: frozen dataclasses, one docstring (``help``) per field, validated on load.

Keys are flat and unique across sections, so a YAML file and the CLI use TRL's names directly
(``beta: 0.2`` / ``--beta 0.2``). Where TRL 1.16's DPOConfig, TrainingArguments or ModelConfig names
a setting, the name and the default are TRL's; README.md lists every deliberate difference.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError
from pipeline.uris import check_uri

LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
    "cpo",
    "simpo",
    "orpo",
)
# TRL 1.16's experimental CPO/ORPO losses: the policy alone, so a run of only these skips stage 2.
REFERENCE_FREE_LOSS_TYPES = frozenset({"cpo", "simpo", "orpo"})
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL 1.16: only losses built on the chosen-rejected score difference accept a non-default f-divergence.
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
# `report_to` values. TensorBoard is always written; wandb and mlflow are the optional external loggers.
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")


def _f(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with its docstring (shown by ``--help``)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults: the config is frozen")
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class ModelConfig:
    model: str = _f(
        "smollm2-135m",
        "Policy model: a local HF directory, a hub id (needs the hub cache), or a builtin name (smollm2-135m).",
    )
    ref_model: str | None = _f(
        None,
        "Reference model; default: `model` (with use_peft: the base model without adapters). A ref_model set "
        "with use_peft is the reference, as in TRL.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "auto", "Weights and compute dtype. auto = bfloat16 on GPU, float32 on CPU."
    )
    bf16: bool | None = _f(
        None,
        "TRL's switch for bfloat16; if set it must agree with `dtype` (true = "
        "bfloat16, false = float32). Unset follows `dtype`.",
    )
    trust_remote_code: bool = _f(False, "Allow model/tokenizer repos that ship their own Python code.")
    allow_pickle_weights: bool = _f(
        False, "Allow loading *.bin/*.pt (pickle) weights; only safetensors load otherwise."
    )
    gradient_checkpointing: bool = _f(True, "Recompute activations in backward to save memory (TRL default: true).")
    activation_offloading: bool = _f(
        False,
        "Keep what backward needs from the forward (with gradient checkpointing: each layer's input, the activation "
        "checkpoints) in pinned host memory until backward, not on the GPU (TRL's activation_offloading; "
        "use_gpu only).",
    )
    tiled_mlp: bool = _f(
        False,
        "Run each decoder layer's MLP over tiles of ~hidden_size positions (DeepSpeed's TiledMLP): its "
        "activations exist one tile at a time, for one more MLP forward per tile in backward. For long sequences.",
    )
    use_peft: bool = _f(False, "Train LoRA adapters instead of all weights.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (scale = lora_alpha / lora_r).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input.")
    lora_target_modules: tuple[str, ...] | None = _f(
        None, "Module names to adapt; default: peft's choice for the architecture."
    )
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = _f(
        "auto",
        "Attention kernels. auto = flash_attention_2 on CUDA with flash-attn and bfloat16, else sdpa "
        "(per-sequence SDPA on padding-free rows). The choice is printed at start.",
    )
    use_liger_kernel: bool | None = _f(
        None,
        "Liger's Triton kernels (RMSNorm, SwiGLU, RoPE); need CUDA and the "
        "`gpu` extra. null = on when both are present (TRL default: false).",
    )
    padding_free: bool = _f(
        True,
        "Pack the 2B sequences of a micro-batch into one row, positions restarting "
        "per sequence, attention never crossing one: no compute on padding. Equal to the "
        "padded path within float32 rounding (TRL 1.16 disables its padding_free).",
    )

    def __post_init__(self) -> None:
        if self.padding_free:
            _check(
                self.attn_implementation != "eager",
                "attn_implementation",
                "eager",
                "auto, sdpa or flash_attention_2 with padding_free (eager attention needs padded rows)",
            )
        _check(self.lora_r >= 1, "lora_r", self.lora_r, "an integer >= 1")
        _check(self.lora_alpha >= 1, "lora_alpha", self.lora_alpha, "an integer >= 1")
        _check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "a number in [0, 1)")
        if self.bf16 is not None and self.dtype != "auto" and self.bf16 != (self.dtype == "bfloat16"):
            raise ConfigError(f"bf16={self.bf16} contradicts dtype={self.dtype}: set only one of them.")


@dataclass(frozen=True)
class DataConfig:
    dataset: tuple[str, ...] = _f(
        ("builtin:demo-train",),
        "Training preference data: .jsonl/.json/.parquet files, globs, directories of them (local, or s3:// "
        "gs:// objects, prefixes and globs), one split of a directory or of a hub dataset in the local Hugging "
        "Face cache (DIR:SPLIT, OWNER/NAME:SPLIT), `datasets` save_to_disk directories, or "
        "builtin names (builtin:demo-train, demo-test, demo-train-text, demo-test-text; "
        "builtin:NAME:N for N pairs).",
    )
    eval_dataset: tuple[str, ...] = _f((), "Held-out preference data, same forms as `dataset`; empty = no eval.")
    max_length: int | None = _f(
        1024,
        "Maximum tokens per prompt+completion sequence; longer ones are "
        "truncated per `truncation_mode`. null = no truncation.",
    )
    truncation_mode: Literal["keep_start", "keep_end"] = _f(
        "keep_start", "keep_start cuts the end of the sequence, keep_end cuts its start."
    )
    cache_dir: str = _f(
        "~/.cache/dpo-pipeline",
        "Root of the content-addressed cache (tokenized data, reference "
        "scores, converted builtin models). Local path, NFS, or a pyarrow URI.",
    )
    output_dir: str = _f("trainer_output", "Where reports, metrics, checkpoints and the final model go.")

    def __post_init__(self) -> None:
        _check(len(self.dataset) > 0, "dataset", self.dataset, "at least one path")
        check_uri("cache_dir", self.cache_dir)
        check_uri("output_dir", self.output_dir)
        if self.max_length is not None:
            _check(self.max_length >= 2, "max_length", self.max_length, "an integer >= 2, or null")


@dataclass(frozen=True)
class LossConfig:
    beta: float = _f(0.1, "Deviation from the reference: higher = closer. For ipo it is τ of the IPO paper.")
    loss_type: tuple[str, ...] = _f(
        ("sigmoid",), "One or more of: " + ", ".join(LOSS_TYPES) + ". Several are combined as a weighted sum (MPO)."
    )
    loss_weights: tuple[float, ...] | None = _f(None, "One weight per loss_type; default 1.0 each.")
    label_smoothing: float = _f(
        0.0,
        "Robust DPO: probability a label is flipped, in [0, 0.5). EXO: ε, must be "
        "> 0. aot/aot_unpaired: conservative smoothing.",
    )
    f_divergence_type: str = _f("reverse_kl", "f-DPO regularizer: " + ", ".join(F_DIVERGENCE_TYPES) + ".")
    f_alpha_divergence_coef: float = _f(0.5, "α of the alpha_divergence regularizer.")
    f_divergence_clamp: bool = _f(
        False,
        "Clamp the exponent of the forward_kl score at 80, as TRL does for "
        "alpha_divergence, so a log-ratio below -80 gives a finite loss and "
        "gradient instead of inf/NaN. false = TRL 1.16's numbers.",
    )
    use_weighting: bool = _f(False, "WPO: weight each pair by the policy's length-normalised probabilities.")
    ld_alpha: float | None = _f(
        None,
        "LD-DPO α in [0, 1]: weight of completion tokens beyond the shorter completion's length. null = plain DPO.",
    )
    discopop_tau: float = _f(0.05, "DiscoPOP temperature τ.")
    cpo_beta: float | None = _f(
        None,
        "β of cpo and simpo (TRL CPOConfig.beta: SimPO's paper uses 2-10); null = beta. Separate so that a mix "
        "with a reference-based loss keeps DPO's β.",
    )
    cpo_alpha: float = _f(
        1.0, "Weight of the chosen NLL term in cpo and simpo (TRL CPOConfig.cpo_alpha); 0 = the SimPO paper."
    )
    simpo_gamma: float = _f(0.5, "SimPO target reward margin γ (TRL CPOConfig.simpo_gamma).")
    alphapo_alpha: float = _f(
        0.0, "AlphaPO reward shape α for cpo and simpo (TRL CPOConfig.alpha); 0 = log-prob rewards."
    )
    orpo_lambda: float = _f(0.1, "ORPO's λ, the weight of the odds-ratio term (TRL ORPOConfig.beta).")

    def __post_init__(self) -> None:
        _check(self.beta > 0 and math.isfinite(self.beta), "beta", self.beta, "a finite number > 0")
        _check(len(self.loss_type) > 0, "loss_type", self.loss_type, "at least one of " + ", ".join(LOSS_TYPES))
        for name in self.loss_type:
            _check(name in LOSS_TYPES, "loss_type", name, "one of " + ", ".join(LOSS_TYPES))
        _check(len(set(self.loss_type)) == len(self.loss_type), "loss_type", self.loss_type, "no repeated names")
        if self.loss_weights is not None:
            _check(
                len(self.loss_weights) == len(self.loss_type),
                "loss_weights",
                self.loss_weights,
                f"{len(self.loss_type)} weight(s), one per loss_type {list(self.loss_type)}",
            )
            for w in self.loss_weights:
                _check(math.isfinite(w), "loss_weights", self.loss_weights, "finite numbers")
        _check(
            self.f_divergence_type in F_DIVERGENCE_TYPES,
            "f_divergence_type",
            self.f_divergence_type,
            "one of " + ", ".join(F_DIVERGENCE_TYPES),
        )
        if self.f_divergence_type != "reverse_kl":
            bad = [t for t in self.loss_type if t not in F_DIVERGENCE_LOSS_TYPES]
            _check(
                not bad,
                "f_divergence_type",
                self.f_divergence_type,
                f"reverse_kl with loss types {bad}: only {sorted(F_DIVERGENCE_LOSS_TYPES)} accept another "
                "f-divergence (TRL 1.16 rule)",
            )
        if self.use_weighting:
            bad = [t for t in self.loss_type if t in ("aot", "aot_unpaired")]
            _check(not bad, "use_weighting", True, f"false with loss types {bad} (WPO is undefined for AOT)")
        _check(0.0 <= self.label_smoothing <= 1.0, "label_smoothing", self.label_smoothing, "a number in [0, 1]")
        if "robust" in self.loss_type:
            _check(
                self.label_smoothing < 0.5,
                "label_smoothing",
                self.label_smoothing,
                "a number in [0, 0.5) with loss_type robust",
            )
        if "exo_pair" in self.loss_type:
            _check(
                self.label_smoothing > 0.0,
                "label_smoothing",
                self.label_smoothing,
                "a number > 0 with loss_type exo_pair (the EXO paper suggests 1e-3)",
            )
        if self.ld_alpha is not None:
            _check(0.0 <= self.ld_alpha <= 1.0, "ld_alpha", self.ld_alpha, "a number in [0, 1], or null")
        _check(self.discopop_tau > 0, "discopop_tau", self.discopop_tau, "a number > 0")
        if self.cpo_beta is not None:
            _check(self.cpo_beta > 0 and math.isfinite(self.cpo_beta), "cpo_beta", self.cpo_beta, "a finite number > 0")
        for key in ("cpo_alpha", "simpo_gamma", "alphapo_alpha", "orpo_lambda"):
            _check(math.isfinite(getattr(self, key)), key, getattr(self, key), "a finite number")
        free = [t for t in self.loss_type if t in REFERENCE_FREE_LOSS_TYPES]
        _check(
            not free or self.ld_alpha is None,
            "ld_alpha",
            self.ld_alpha,
            f"null with loss types {free} (LD-DPO is defined for reference log-ratios)",
        )
        _check(
            not free or not self.use_weighting,
            "use_weighting",
            True,
            f"false with loss types {free} (TRL's CPO and ORPO trainers have no WPO)",
        )
        _check(
            math.isfinite(self.f_alpha_divergence_coef),
            "f_alpha_divergence_coef",
            self.f_alpha_divergence_coef,
            "a finite number",
        )

    @property
    def needs_reference(self) -> bool:
        """Whether any loss reads the reference: false only for reference-free losses alone (no stage 2)."""
        return any(t not in REFERENCE_FREE_LOSS_TYPES for t in self.loss_type)

    @property
    def weights(self) -> tuple[float, ...]:
        """`loss_weights`, or 1.0 per loss type."""
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_type)


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = _f(1e-6, "Peak AdamW learning rate (TRL DPO default).")
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = _f("linear", "Decay after warm-up.")
    warmup_ratio: float = _f(0.0, "Warm-up as a fraction of the total steps (used when warmup_steps is 0).")
    warmup_steps: int = _f(0, "Warm-up steps; overrides warmup_ratio when > 0.")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.")
    per_device_train_batch_size: int = _f(
        8, "Preference pairs per worker per micro-batch (one forward of 2B sequences)."
    )
    per_device_eval_batch_size: int = _f(8, "Pairs per worker per eval batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    num_train_epochs: float = _f(3.0, "Passes over the training data (fractions allowed).")
    max_steps: int = _f(-1, "Stop after this many optimizer steps; -1 = use num_train_epochs.")
    logging_steps: int = _f(10, "Optimizer steps per metrics line (TRL DPO default: 10).")
    save_steps: int = _f(500, "Optimizer steps per checkpoint.")
    eval_steps: int | None = _f(None, "Optimizer steps per evaluation; null = logging_steps.")
    seed: int = _f(42, "Seed for weights init of adapters, data order and dropout; same seed = same run.")
    precompute_ref_batch_size: int | None = _f(
        None, "Pairs per reference-scoring batch; null = per_device_train_batch_size."
    )
    precompute_ref_max_tokens: int | None = _f(
        None,
        "Token budget per reference-scoring batch (chosen + rejected tokens, padding counted when padding_free is "
        "off), at most precompute_ref_batch_size pairs; null = max_tokens_per_batch (null too: pairs alone).",
    )
    max_tokens_per_batch: int | None = _f(
        None,
        "Token budget per micro-batch (chosen + rejected tokens, "
        "padding counted when padding_free is off) instead of a fixed "
        "number of pairs; pairs are length-grouped within shuffled windows. "
        "null = per_device_train/eval_batch_size pairs.",
    )
    report_to: tuple[str, ...] = _f(
        ("none",),
        "Experiment loggers besides the TensorBoard events, which are always "
        "written: none, or one or more of wandb, mlflow (tensorboard is accepted and "
        "changes nothing). Nothing is imported or contacted unless named here.",
    )

    def __post_init__(self) -> None:
        _check(self.learning_rate >= 0, "learning_rate", self.learning_rate, "a number >= 0")
        _check(0.0 <= self.warmup_ratio <= 1.0, "warmup_ratio", self.warmup_ratio, "a number in [0, 1]")
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _check(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, "a number >= 0")
        for key in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_steps",
        ):
            _check(getattr(self, key) >= 1, key, getattr(self, key), "an integer >= 1")
        _check(self.num_train_epochs > 0, "num_train_epochs", self.num_train_epochs, "a number > 0")
        _check(self.max_steps == -1 or self.max_steps >= 1, "max_steps", self.max_steps, "-1 or an integer >= 1")
        if self.eval_steps is not None:
            _check(self.eval_steps >= 1, "eval_steps", self.eval_steps, "an integer >= 1, or null")
        if self.max_tokens_per_batch is not None:
            _check(
                self.max_tokens_per_batch >= 2,
                "max_tokens_per_batch",
                self.max_tokens_per_batch,
                "an integer >= 2 (one pair needs at least 2 tokens), or null",
            )
        if self.precompute_ref_max_tokens is not None:
            _check(
                self.precompute_ref_max_tokens >= 2,
                "precompute_ref_max_tokens",
                self.precompute_ref_max_tokens,
                "an integer >= 2 (one pair needs at least 2 tokens), or null",
            )
        if self.precompute_ref_batch_size is not None:
            _check(
                self.precompute_ref_batch_size >= 1,
                "precompute_ref_batch_size",
                self.precompute_ref_batch_size,
                "an integer >= 1, or null",
            )
        for name in self.report_to:  # no `all`: a logger runs only where it is named
            _check(name in REPORT_TO, "report_to", name, "one of " + ", ".join(REPORT_TO))
        _check(len(set(self.report_to)) == len(self.report_to), "report_to", self.report_to, "no repeated names")
        if "none" in self.report_to:
            _check(len(self.report_to) == 1, "report_to", self.report_to, "none alone, or a list without none")

    @property
    def ref_batch_size(self) -> int:
        return self.precompute_ref_batch_size or self.per_device_train_batch_size

    @property
    def ref_max_tokens(self) -> int | None:
        return self.precompute_ref_max_tokens or self.max_tokens_per_batch


@dataclass(frozen=True)
class ScaleConfig:
    num_workers: int = _f(1, "Ray Train workers (one DeepSpeed rank each).")
    use_gpu: bool = _f(False, "One GPU per training worker, gpus_per_ref_actor per reference actor.")
    cpus_per_worker: int | None = _f(
        None, "CPUs per training worker (sets its torch threads); null = the machine's CPUs / num_workers."
    )
    zero_stage: Literal[0, 1, 2, 3] = _f(2, "DeepSpeed ZeRO stage: 0 (plain DDP), 1, 2 or 3.")
    sequence_parallel_size: int = _f(
        1,
        "Training workers that share every sequence (DeepSpeed Ulysses): each holds 1/k of its positions and "
        "attends with 1/k of the heads, for pairs too long for one worker. Data parallelism runs over the "
        "num_workers / k groups: global batch = per_device_train_batch_size x num_workers / k x "
        "gradient_accumulation_steps. 1 = off.",
    )
    offload_optimizer: bool = _f(False, "ZeRO-Offload the optimizer state to CPU memory (stage >= 1).")
    offload_param: bool = _f(False, "ZeRO-Offload parameters to CPU memory (stage 3 only).")
    zero3_max_live_parameters: int = _f(
        1_000_000_000,
        "ZeRO-3: parameters a rank keeps gathered at once, prefetched or awaiting reuse (DeepSpeed's "
        "stage3_max_live_parameters and stage3_max_reuse_distance, at DeepSpeed's default). Lower it where that "
        "window is a large share of the model.",
    )
    ref_actors: int = _f(1, "Actors in the reference-scoring pool (one model copy each).")
    cpus_per_ref_actor: int | None = _f(
        None, "CPUs per scoring actor (sets its torch threads); null = the machine's CPUs / ref_actors."
    )
    gpus_per_ref_actor: int = _f(
        1,
        "GPUs per scoring actor, with use_gpu: the reference's layers are spread over them, each weight read "
        "straight onto its GPU. Raise it for a reference bigger than one GPU; one that fits on none is refused.",
    )
    max_failures: int = _f(1, "Times a crashed training worker group is restarted from the last checkpoint.")
    storage_path: str | None = _f(
        None, "Ray Train storage for checkpoints (local path or s3:// gs:// URI); null = <output_dir>/ray."
    )
    run_name: str = _f("dpo", "Ray Train run name; rerunning with the same storage_path and run_name resumes.")

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "num_workers", self.num_workers, "an integer >= 1")
        k = self.sequence_parallel_size
        _check(k >= 1, "sequence_parallel_size", k, "an integer >= 1")
        _check(self.num_workers % k == 0, "sequence_parallel_size", k,
               f"a divisor of num_workers={self.num_workers} (each group of k workers shares its sequences); "
               f"set num_workers to a multiple of {k}")  # fmt: skip
        _check(self.ref_actors >= 1, "ref_actors", self.ref_actors, "an integer >= 1")
        _check(self.gpus_per_ref_actor >= 1, "gpus_per_ref_actor", self.gpus_per_ref_actor, "an integer >= 1")
        if self.gpus_per_ref_actor > 1:
            _check(self.use_gpu, "gpus_per_ref_actor", self.gpus_per_ref_actor, "1 unless use_gpu is true")
        _check(self.max_failures >= 0, "max_failures", self.max_failures, "an integer >= 0")
        check_uri("storage_path", self.storage_path)
        for key in ("cpus_per_worker", "cpus_per_ref_actor"):
            value = getattr(self, key)
            _check(value is None or value >= 1, key, value, "an integer >= 1, or null")
        if self.offload_param:
            _check(self.zero_stage == 3, "offload_param", True, "false unless zero_stage is 3")
        _check(self.zero3_max_live_parameters >= 1, "zero3_max_live_parameters", self.zero3_max_live_parameters,
               "an integer >= 1")  # fmt: skip
        if self.offload_optimizer:
            _check(self.zero_stage >= 1, "offload_optimizer", True, "false unless zero_stage >= 1")

    @property
    def data_parallel_size(self) -> int:
        """Groups of workers that see different pairs: num_workers / sequence_parallel_size."""
        return self.num_workers // self.sequence_parallel_size

    @property
    def ref_actor_gpus(self) -> int:
        """GPUs one scoring actor asks Ray for: gpus_per_ref_actor with use_gpu, else 0."""
        return self.gpus_per_ref_actor if self.use_gpu else 0


@dataclass(frozen=True)
class GenerateConfig:
    max_new_tokens: int = _f(
        64, "Tokens per generated completion of an eval prompt (`generate`; `run` with eval data); 0 = none."
    )
    num_generations: int = _f(0, "Sampled completions per eval prompt, besides the greedy one.")
    temperature: float = _f(1.0, "Sampling temperature of the sampled completions.")
    top_p: float = _f(1.0, "Nucleus sampling: keep the smallest token set with this much probability.")
    report_samples: int = _f(8, "Eval prompts shown side by side (chosen, rejected, reference, policy) in the report.")
    judge: str | None = _f(
        None,
        "A Python function `module:function(prompt, reference, policy) -> float in [0, 1]` (1 = the policy's "
        "answer is better) scoring each eval prompt's greedy answers; its mean is the win rate in the report.",
    )

    def __post_init__(self) -> None:
        for key in ("max_new_tokens", "num_generations", "report_samples"):
            _check(getattr(self, key) >= 0, key, getattr(self, key), "an integer >= 0")
        _check(
            self.temperature > 0 and math.isfinite(self.temperature), "temperature", self.temperature, "a number > 0"
        )
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        if self.judge is not None:
            module, _, function = self.judge.partition(":")
            _check(bool(module and function), "judge", self.judge, "`module:function`, or null")


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "scale": ScaleConfig,
    "generate": GenerateConfig,
}


@dataclass(frozen=True)
class Config:
    """Everything a run needs; passed to Ray as this object."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def __post_init__(self) -> None:
        if self.model.activation_offloading:
            _check(self.scale.use_gpu, "activation_offloading", True,
                   "false unless use_gpu is true (a CPU worker's activations are in host memory already)")  # fmt: skip
        if self.scale.sequence_parallel_size > 1:
            _check(self.model.attn_implementation != "eager", "attn_implementation", "eager",
                   "auto, sdpa or flash_attention_2 with sequence_parallel_size > 1 (sequence parallelism takes "
                   "causality from positions; eager attention needs a full (T, T) mask)")  # fmt: skip

    @property
    def compute_dtype(self) -> str:
        """The resolved dtype name: float32 or bfloat16."""
        if self.model.bf16 is not None:
            return "bfloat16" if self.model.bf16 else "float32"
        if self.model.dtype == "auto":
            return "bfloat16" if self.scale.use_gpu else "float32"
        return self.model.dtype

    @property
    def ref_model_name(self) -> str:
        return self.model.ref_model or self.model.model

    def flat(self) -> dict[str, Any]:
        """The effective config as flat keys (what a YAML file would hold)."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            for f in dataclasses.fields(getattr(self, section)):
                value = getattr(getattr(self, section), f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def with_absolute_paths(self) -> Config:
        """Local paths made absolute, so Ray workers (whose working directory differs) write where meant."""

        def absolute(p: str) -> str:
            return p if "://" in p else str(Path(p).expanduser().resolve())

        d, storage = self.data, self.scale.storage_path
        return dataclasses.replace(
            self,
            data=dataclasses.replace(d, cache_dir=absolute(d.cache_dir), output_dir=absolute(d.output_dir)),
            scale=dataclasses.replace(self.scale, storage_path=None if storage is None else absolute(storage)),
        )

    def replace(self, **overrides: Any) -> Config:
        """A copy with flat keys replaced (validated again)."""
        return config_from_dict({**self.flat(), **overrides})


def config_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Flat key -> (section name, field)."""
    out: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            out[f.name] = (section, f)
    return out


def field_type(section: str, name: str) -> Any:
    return typing.get_type_hints(SECTIONS[section])[name]


# TRL's names (its ModelConfig and ScriptArguments) for our keys, accepted in config files and as flags.
TRL_ALIASES = {"model_name_or_path": "model", "torch_dtype": "dtype"}
# TRL names a hub dataset and its splits apart; here a split is part of the dataset spec (OWNER/NAME:SPLIT).
TRL_SPLIT_KEYS = {"dataset_train_split": ("dataset", "train"), "dataset_test_split": ("eval_dataset", None)}
TRL_KEYS = (*TRL_ALIASES, "dataset_name", *TRL_SPLIT_KEYS)


def from_trl_names(values: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """The values with TRL's key names put as ours, and what each became (`model_name_or_path -> model`).

    `dataset_name` with `dataset_train_split` (default `train`) sets `dataset` to `NAME:SPLIT`; with
    `dataset_test_split` it also sets `eval_dataset` (TRL evaluates only when asked to, so without it there is
    no eval set). A TRL name next to ours with another value is a ConfigError: which one would win is not said."""
    out = dict(values)
    said: list[str] = []

    def put(key: str, value: Any, came_from: str) -> None:
        if key in out and out[key] != value and _as_list(out[key]) != _as_list(value):
            raise ConfigError(
                f"{source}: {came_from} (TRL's name) gives {key} = {value!r}, but {key} = {out[key]!r} is set too: "
                "set one of them"
            )
        out[key] = value
        said.append(f"{came_from} -> {key}" + (f" = {value[0]}" if key in ("dataset", "eval_dataset") else ""))

    for alias, key in TRL_ALIASES.items():
        if alias in out:
            put(key, out.pop(alias), alias)
    name = out.pop("dataset_name", None)
    splits = {k: out.pop(k) for k in TRL_SPLIT_KEYS if k in out}
    if splits and name is None:
        raise ConfigError(
            f"{source}: {', '.join(splits)} name(s) a split of dataset_name (TRL's keys): set dataset_name too, "
            "or name the split in dataset / eval_dataset as OWNER/NAME:SPLIT"
        )
    if name is not None:
        for split_key, (key, default) in TRL_SPLIT_KEYS.items():
            split = splits.get(split_key, default)
            if split is not None:
                put(key, [f"{name}:{split}"], "dataset_name" + (f" + {split_key}" if split_key in splits else ""))
    return out, said


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else list(value) if isinstance(value, tuple | list) else value


def config_from_dict(values: dict[str, Any], source: str = "config") -> Config:
    """Build and validate a Config from flat keys (TRL's names too, said once on the console as the key each
    sets); unknown keys and bad values raise ConfigError."""
    values, said = from_trl_names(values, source)
    if said:
        print(f"[config] TRL's key names read as ours: {'; '.join(said)}", flush=True)
    known = config_fields()
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = [_suggest(k, known) for k in unknown]
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(h for h in hints)}. Run `dpo-pipeline train "
            "--help` for the list of keys."
        )
    per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, raw in values.items():
        section, _ = known[key]
        per_section[section][key] = coerce(raw, field_type(section, key), key, source)
    try:
        return Config(**{s: cls(**per_section[s]) for s, cls in SECTIONS.items()})
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML file of flat keys (optional), apply overrides, validate."""
    values: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of keys to values, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    return config_from_dict(values, source=source if not overrides else f"{source} + command line")


# --- value coercion: YAML values and command-line strings into the annotated types ---

_NONE_STRINGS = {"none", "null", "~", ""}
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def coerce(raw: Any, tp: Any, key: str, source: str = "config") -> Any:
    """Convert `raw` (a YAML value or a command-line string) to type `tp`, or raise ConfigError naming `key`."""
    try:
        return _coerce(raw, tp)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"{source}: {key}={raw!r} is not {describe_type(tp)}{': ' + str(e) if str(e) else ''}"
        ) from None


def _coerce(raw: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in _NONE_STRINGS):
            return None
        return _coerce(raw, inner[0])
    if origin is Literal:
        for choice in args:
            if raw == choice or (isinstance(raw, str) and str(choice) == raw.strip()):
                return choice
        raise ValueError("")
    if origin is tuple:
        items = [s.strip() for s in raw.split(",") if s.strip()] if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)):
            items = [items]
        return tuple(_coerce(item, args[0]) for item in items)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ValueError("")
    if tp is int:
        if isinstance(raw, bool):
            raise ValueError("")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str):
            return int(raw.strip())
        raise ValueError("")
    if tp is float:
        if isinstance(raw, bool):
            raise ValueError("")
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, str):
            return float(raw.strip())
        raise ValueError("")
    if tp is str:
        if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
            return str(raw)
        raise ValueError("")
    raise TypeError(f"unsupported config type {tp}")


def describe_type(tp: Any) -> str:
    """Human words for an annotated type, for errors and --help."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return f"{describe_type(inner[0])} or null"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is tuple:
        plural = {str: "strings", float: "numbers", int: "integers"}.get(args[0], str(args[0]))
        return f"a list of {plural} (comma-separated on the command line)"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")


def _suggest(key: str, known: dict[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(known), n=1)
    return f"'{key}' (did you mean '{close[0]}'?)" if close else f"'{key}'"
