"""``TrainConfig`` to transformers ``TrainingArguments``, and where metrics are reported."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .config import TrainConfig


def training_args(config: TrainConfig, checkpoints: Path, *, has_eval: bool) -> Any:
    """The ``TrainingArguments`` of a run (only the names this transformers version knows are passed)."""
    import dataclasses

    import torch
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    bf16 = config.bf16
    if bf16 is None:
        bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    kwargs: dict[str, Any] = dict(
        output_dir=str(checkpoints),
        num_train_epochs=1,  # the stream already holds every epoch of every stage
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        max_grad_norm=config.max_grad_norm,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        bf16=bf16,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(config.eval_steps or config.save_steps) if has_eval else None,
        prediction_loss_only=True,
        label_names=["labels"],  # a peft model's forward hides them from the Trainer's introspection
        remove_unused_columns=False,
        report_to=report_to(config.report_to),
        disable_tqdm=not config.progress,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_pin_memory=torch.cuda.is_available(),
        deepspeed=config.deepspeed,
        fsdp=config.fsdp or None,
    )
    # transformers 5 renamed gradient checkpointing to activation checkpointing (the old name still works, with a warning)
    checkpointing = (
        "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    )
    kwargs[checkpointing] = config.gradient_checkpointing
    if config.gradient_checkpointing:
        kwargs[f"{checkpointing}_kwargs"] = {"use_reentrant": False}
    if has_eval and "eval_on_start" in known:
        kwargs["eval_on_start"] = True  # the untrained model's eval loss, for comparison
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in known and v is not None})


def report_to(setting: str) -> str | list[str]:
    """``auto``: TensorBoard and W&B where installed (W&B only when logged in or configured), else ``none``."""
    if setting != "auto":
        names = [s.strip() for s in setting.split(",") if s.strip()]
        if not names or names == ["none"]:
            return "none"
        return "all" if names == ["all"] else names
    found = []
    if (
        importlib.util.find_spec("tensorboard") is not None
        or importlib.util.find_spec("tensorboardX") is not None
    ):
        found.append("tensorboard")
    if importlib.util.find_spec("wandb") is not None and os.environ.get("WANDB_DISABLED", "").lower() not in {
        "1",
        "true",
    }:
        netrc = Path.home() / ".netrc"
        configured = bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))
        if not configured and netrc.is_file():
            configured = "api.wandb.ai" in netrc.read_text(errors="ignore")
        if configured:
            found.append("wandb")
    return found or "none"


__all__ = ["report_to", "training_args"]
