"""``TrainConfig``: every setting of an Aligner training run, with the official recipe as defaults.

One ``@dataclass`` is the single source of truth: each field's ``metadata["help"]`` is also its
``aligner train`` help text, and ``metadata["flags"]`` its command-line spelling (see ``cli.py``).
Defaults follow the released Aligner code (ALIGNER.md): 3 epochs, lr 2e-5 cosine with 3% warm-up,
weight decay 0, Adam betas (0.9, 0.95), per-device batch 4 x gradient accumulation 8, max length
2048, bf16 where supported, gradient checkpointing; plus the paper's 20% identity warm-up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import AlignerError

OVERLONG_POLICIES = ("error", "drop", "truncate")
SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class TrainConfigError(AlignerError, ValueError):
    """A training setting is out of range, or two settings contradict each other."""


def check_locations(config: Any) -> None:
    """``data``, ``base_model`` and ``output_dir`` of a training config name something (shared by both trainers)."""
    if isinstance(config.data, (str, os.PathLike)) and not os.fspath(config.data).strip():
        raise TrainConfigError("data must name a file, directory or dataset, got an empty string")
    for name in ("base_model", "output_dir"):
        value = getattr(config, name)
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
            raise TrainConfigError(f"{name} must be a non-empty path or id, got {value!r}")


def _opt(default: Any, help: str, *flags: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, "flags": flags, **extra})


def _req(help: str, *flags: str, **extra: Any) -> Any:
    return field(metadata={"help": help, "flags": flags, **extra})


@dataclass
class TrainConfig:
    """Settings of ``train_aligner``; ``aligner train --help`` lists the same fields."""

    # -- what to train on, from what, into where ----------------------------------------------
    data: str | os.PathLike[str] | Sequence[Mapping[str, Any]] = _req(
        "Training records: a .jsonl/.json/.csv/.parquet file, a directory saved with datasets' "
        "save_to_disk, a `datasets` name, or (from Python) a list of dicts.",
        argument=True,
        cli_type=str,
    )
    base_model: str = _req("Model to start from: hub id, local directory or GGUF file.", "--base-model", "-m")
    output_dir: str = _req(
        "Directory to write the trained Aligner (and its checkpoints/) into.", "--output", "-o"
    )
    template: str = _opt(
        "aligner-v1",
        "Prompt template the Aligner is trained with and recorded under (aligner-v1, aligner-general, ...).",
    )
    question_field: str = _opt("question", "Record field holding the question.")
    answer_field: str = _opt("answer", "Record field holding the upstream answer.")
    correction_field: str = _opt("correction", "Record field holding the corrected answer.")
    dataset_split: str = _opt(
        "train", "Split to read when DATA is a `datasets` name or directory.", "--split"
    )
    dataset_config: str | None = _opt(None, "Configuration name when DATA is a `datasets` name.")
    eval_data: str | None = _opt(None, "Held-out records (same formats as DATA) for the eval loss.")
    eval_fraction: float = _opt(0.0, "Fraction of DATA held out for the eval loss (instead of --eval-data).")

    # -- the residual recipe --------------------------------------------------------------------
    identity_fraction: float = _opt(
        0.2,
        "Size of the identity warm-up slice (Q-A-A, correction := answer) as a fraction of the training "
        "records; it is trained first, then the Q-A-C stage. 0 skips the warm-up.",
    )
    identity_only: bool = _opt(
        False, "Train only the identity stage: an Aligner that copies (a base for later runs)."
    )
    identity_epochs: float | None = _opt(None, "Epochs of the identity stage (default: --epochs).")
    save_identity: bool = _opt(
        True,
        "Also save the model as it is after the identity stage, to OUTPUT/identity (a copying Aligner).",
        "--save-identity/--no-save-identity",
    )
    max_length: int = _opt(2048, "Longest training sequence in tokens (prompt + correction + EOS).")
    overlong: str = _opt(
        "error",
        "Records longer than --max-length: 'error' (list them and stop), 'drop' them, or 'truncate' the "
        "correction's tail.",
    )

    # -- optimisation (the official recipe) ----------------------------------------------------
    epochs: float = _opt(3.0, "Epochs of the Q-A-C stage.")
    max_steps: int = _opt(
        -1, "Stop after this many optimizer steps in all (a smoke test); -1: run all epochs."
    )
    learning_rate: float = _opt(2e-5, "Peak learning rate.", "--lr", "--learning-rate")
    lr_scheduler: str = _opt(
        "cosine", "Learning-rate schedule of each stage: cosine, linear or constant.", "--scheduler"
    )
    warmup_ratio: float = _opt(0.03, "Linear warm-up, as a fraction of each stage's steps.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.95, "AdamW beta2.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm.")
    batch_size: int = _opt(4, "Per-device training batch size.", "--batch-size")
    gradient_accumulation_steps: int = _opt(
        8, "Micro-batches accumulated per optimizer step.", "--grad-accum"
    )
    eval_batch_size: int | None = _opt(None, "Per-device eval batch size (default: --batch-size).")
    seed: int = _opt(
        42, "Seed for the split, the identity slice, the shuffling and the initialisation of LoRA."
    )

    # -- model and precision ------------------------------------------------------------------
    bf16: bool | None = _opt(
        None, "bf16 mixed precision (default: on where the GPU supports it).", "--bf16/--no-bf16"
    )
    gradient_checkpointing: bool = _opt(
        True,
        "Recompute activations in the backward pass to save memory.",
        "--gradient-checkpointing/--no-gradient-checkpointing",
    )
    dtype: str = _opt(
        "auto",
        "Weights dtype when loading: auto (float32 for full fine-tuning, bf16 under LoRA with bf16), "
        "float32, bfloat16, float16.",
    )
    trust_remote_code: bool = _opt(False, "Allow model code from the model repository.")
    allow_pickle: bool = _opt(False, "Allow pickle (.bin) weights, which can run code when loaded.")

    # -- LoRA -----------------------------------------------------------------------------------
    lora: bool = _opt(False, "Train a LoRA adapter (peft) instead of all weights.")
    lora_r: int = _opt(16, "LoRA rank.")
    lora_alpha: int = _opt(32, "LoRA alpha.")
    lora_dropout: float = _opt(0.05, "LoRA dropout.")
    lora_target_modules: str = _opt(
        "all-linear", "Modules LoRA adapts: 'all-linear' or comma-separated names."
    )
    merge_lora: bool = _opt(
        False,
        "Save the base with the adapter merged in to --output (the adapter alone goes to OUTPUT/adapter).",
        "--merge-lora",
    )

    # -- checkpoints, logs, distribution -------------------------------------------------------
    logging_steps: int = _opt(10, "Log the training loss every N steps (to metrics.jsonl and reporters).")
    save_steps: int = _opt(500, "Save a checkpoint every N steps (and at the end of each stage).")
    eval_steps: int | None = _opt(None, "Compute the eval loss every N steps (default: --save-steps).")
    save_total_limit: int | None = _opt(2, "Keep at most N checkpoints in OUTPUT/checkpoints.")
    resume: bool = _opt(False, "Resume from the last checkpoint in OUTPUT/checkpoints.")
    overwrite: bool = _opt(False, "Start afresh even if OUTPUT holds an earlier run.")
    report_to: str = _opt(
        "auto",
        "Where metrics go besides metrics.jsonl: auto (TensorBoard and W&B when installed), none, or a "
        "comma-separated list.",
    )
    deepspeed: str | None = _opt(
        None, "DeepSpeed JSON config (or use `accelerate launch` with a DeepSpeed config)."
    )
    fsdp: str | None = _opt(None, "FSDP options, e.g. 'full_shard auto_wrap' (or use `accelerate launch`).")
    progress: bool = _opt(True, "Show a progress bar.", "--progress/--no-progress")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``TrainConfigError`` naming the setting and the value received."""
        check_locations(self)
        self._check_numbers()
        self._check_combinations()

    def _check_numbers(self) -> None:
        _fraction("identity_fraction", self.identity_fraction, upper_inclusive=True)
        _fraction("eval_fraction", self.eval_fraction, upper_inclusive=False)
        _fraction("warmup_ratio", self.warmup_ratio, upper_inclusive=False)
        _fraction("lora_dropout", self.lora_dropout, upper_inclusive=False)
        for name in (
            "max_length",
            "batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_steps",
            "lora_r",
            "lora_alpha",
        ):
            _positive_int(name, getattr(self, name))
        for name in ("eval_batch_size", "eval_steps", "save_total_limit"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if not isinstance(self.max_steps, int) or self.max_steps == 0 or self.max_steps < -1:
            raise TrainConfigError(
                f"max_steps must be a positive integer or -1 (all epochs), got {self.max_steps!r}"
            )
        for name in ("epochs", "learning_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise TrainConfigError(f"{name} must be a positive number, got {value!r}")
        if self.identity_epochs is not None and (
            not isinstance(self.identity_epochs, (int, float)) or self.identity_epochs <= 0
        ):
            raise TrainConfigError(f"identity_epochs must be a positive number, got {self.identity_epochs!r}")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("adam_beta1", "adam_beta2"):
            _fraction(name, getattr(self, name), upper_inclusive=False)
        _choice("overlong", self.overlong, OVERLONG_POLICIES)
        _choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _choice("dtype", self.dtype, DTYPES)

    def _check_combinations(self) -> None:
        if self.resume and self.overwrite:
            raise TrainConfigError("resume and overwrite contradict each other: pick one")
        if self.merge_lora and not self.lora:
            raise TrainConfigError("merge_lora needs lora=True (--lora): there is no adapter to merge")
        if self.eval_data is not None and self.eval_fraction > 0:
            raise TrainConfigError("pass eval_data or eval_fraction, not both")
        if self.identity_only and self.identity_fraction == 0:
            raise TrainConfigError(
                "identity_only needs identity_fraction > 0: the identity stage would be empty"
            )
        if self.deepspeed is not None and self.fsdp is not None:
            raise TrainConfigError("pass deepspeed or fsdp, not both")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values (a list of records is summarised by its length)."""
        values = asdict(self)
        if _is_records(self.data):
            values["data"] = f"<{len(self.data)} records>"  # type: ignore[arg-type]
        for name in ("data", "base_model", "output_dir"):
            if isinstance(values[name], os.PathLike):
                values[name] = os.fspath(values[name])
        return values


def _is_records(data: Any) -> bool:
    return not isinstance(data, (str, bytes, os.PathLike)) and isinstance(data, Sequence)


def _fraction(name: str, value: Any, *, upper_inclusive: bool) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value >= 0
        and (value <= 1 if upper_inclusive else value < 1)
    )
    if not ok:
        bound = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise TrainConfigError(f"{name} must be a number in {bound}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TrainConfigError(f"{name} must be a positive integer, got {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise TrainConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


__all__ = ["DTYPES", "OVERLONG_POLICIES", "SCHEDULERS", "TrainConfig", "TrainConfigError"]
