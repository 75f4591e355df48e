"""The output directory: refuse to mix runs, clear it (overwrite), find the checkpoint to resume
from, fingerprint what decides the data order, and save weights + tokenizer + recorded template."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..loading import write_aligner_config
from .config import TrainConfig, TrainConfigError
from .encode import Example

logger = logging.getLogger("aligner_core.training")

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
RUN_FILE = "run.json"
IDENTITY_DIR = "identity"
ADAPTER_DIR = "adapter"

#: What a run leaves in OUTPUT; ``overwrite`` removes these and nothing else.
_OUR_DIRS = (CHECKPOINTS, IDENTITY_DIR, ADAPTER_DIR)
_OUR_FILES = (
    METRICS,
    "aligner_config.json",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
)
#: Settings that decide which example each step reads (with the data itself): resume needs them unchanged.
_ORDER_KEYS = (
    "template",
    "identity_fraction",
    "identity_only",
    "identity_epochs",
    "epochs",
    "max_length",
    "overlong",
    "seed",
    "batch_size",
    "gradient_accumulation_steps",
    "lora",
)


def check_output(out: Path, config: TrainConfig) -> None:
    """Refuse to mix a new run into an earlier one unless ``resume`` or ``overwrite`` says how."""
    if out.exists() and not out.is_dir():
        raise TrainConfigError(f"output_dir {out} exists and is not a directory")
    earlier = any((out / name).exists() for name in (CHECKPOINTS, METRICS, "aligner_config.json"))
    if earlier and not (config.resume or config.overwrite):
        raise TrainConfigError(
            f"{out} holds an earlier training run: pass resume=True (--resume) to continue it or "
            "overwrite=True (--overwrite) to start afresh"
        )


def fingerprint(config: TrainConfig, world_size: int, groups: Sequence[Sequence[Example]]) -> str:
    """A hash of the tokenized examples and of the settings that order them."""
    h = hashlib.sha256()
    settings = {k: getattr(config, k) for k in _ORDER_KEYS} | {"world_size": world_size}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for group in groups:
        h.update(b"|")
        for ex in group:
            h.update(array("q", ex.input_ids).tobytes())
            h.update(len(ex.labels).to_bytes(4, "little") + ex.prompt_length.to_bytes(4, "little"))
    return h.hexdigest()


def prepare_output(out: Path, config: TrainConfig, args: Any, run_fingerprint: str) -> str | None:
    """Clear (overwrite) or check (resume) the output; return the checkpoint to resume from."""
    from transformers.trainer_utils import get_last_checkpoint

    ckpt = out / CHECKPOINTS
    resume_from = get_last_checkpoint(str(ckpt)) if config.resume and ckpt.is_dir() else None
    if resume_from is not None and (ckpt / RUN_FILE).is_file():
        earlier = json.loads((ckpt / RUN_FILE).read_text(encoding="utf-8")).get("fingerprint")
        if earlier != run_fingerprint:
            raise TrainConfigError(
                f"the data or settings differ from those of the run checkpointed in {ckpt}: resuming would "
                "skip the wrong examples. Resume with the same data and settings, or pass --overwrite"
            )
    if config.resume and resume_from is not None:
        logger.info("resuming from %s", resume_from)
    elif config.resume:
        logger.info("no checkpoint in %s: starting from the beginning", ckpt)
    with args.main_process_first(local=False, desc="output directory"):
        if args.process_index == 0:
            if config.overwrite:
                for name in _OUR_DIRS:
                    shutil.rmtree(out / name, ignore_errors=True)
                for name in _OUR_FILES:
                    (out / name).unlink(missing_ok=True)
            ckpt.mkdir(parents=True, exist_ok=True)
            if resume_from is None:
                (out / METRICS).write_text("", encoding="utf-8")
            run = {"fingerprint": run_fingerprint, "config": config.to_dict()}
            (ckpt / RUN_FILE).write_text(json.dumps(run, indent=2, default=str) + "\n", encoding="utf-8")
    return resume_from


def save(trainer: Any, target: Path, template: str, meta: dict[str, Any]) -> None:
    """Weights (or the adapter) as safetensors, the tokenizer, and the recorded template.

    Call it on every rank: ``Trainer.save_model`` gathers sharded (DeepSpeed/FSDP) weights.
    """
    model = trainer.model
    base_config = getattr(getattr(model, "get_base_model", lambda: model)(), "config", None)
    previous = getattr(base_config, "use_cache", None)
    if base_config is not None:
        base_config.use_cache = True  # generation wants the KV cache; gradient checkpointing turned it off
    try:
        trainer.save_model(str(target))
    finally:
        if base_config is not None and previous is not None:
            base_config.use_cache = previous
    if trainer.is_world_process_zero():
        (target / "training_args.bin").unlink(
            missing_ok=True
        )  # a pickle; the settings are in aligner_config.json
        write_aligner_config(target, template=template, **meta)


__all__ = [
    "ADAPTER_DIR",
    "CHECKPOINTS",
    "IDENTITY_DIR",
    "METRICS",
    "RUN_FILE",
    "check_output",
    "fingerprint",
    "prepare_output",
    "save",
]
