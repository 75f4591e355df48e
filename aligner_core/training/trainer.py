"""``train_aligner(config) -> Path``: the residual-correction recipe, end to end.

1. Check everything that can be checked before compute: settings, the output directory, every
   record, the template against the base tokenizer, every sequence's length.
2. Lay out the stream: the identity warm-up (Q-A-A) epochs, then the Q-A-C epochs (``stages.py``).
3. Train with the transformers ``Trainer`` (one run, a learning-rate schedule per stage), full
   fine-tuning or LoRA, checkpoints under ``OUTPUT/checkpoints`` for ``resume``.
4. Save safetensors weights (or the adapter), the tokenizer and ``aligner_config.json`` recording
   the template, so ``Aligner.from_pretrained(OUTPUT)`` needs no flags.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import missing
from ..loading import write_aligner_config
from ..templates import Template, get_template
from .config import TrainConfig
from .data import Fields, Record, TrainingDataError, identity_slice, load_records, split_eval
from .encode import EncodeReport, Example, ExampleEncoder, encode_records
from .output import (
    ADAPTER_DIR,
    CHECKPOINTS,
    IDENTITY_DIR,
    METRICS,
    check_output,
    fingerprint,
    prepare_output,
    save,
)

logger = logging.getLogger("aligner_core.training")


@dataclass
class Prepared:
    """The checked, tokenized data of a run."""

    template: Template
    eos_token_id: int
    train_records: list[Record]
    identity: list[Example]
    correction: list[Example]
    held_out: list[Example]
    reports: dict[str, EncodeReport] = field(default_factory=dict)


def train_aligner(config: TrainConfig, *, model: Any = None, tokenizer: Any = None) -> Path:
    """Train an Aligner as ``config`` says and return the output directory.

    ``model``/``tokenizer`` may be given as loaded objects (``config.base_model`` then only names the
    base in the recorded metadata). The result loads with ``Aligner.from_pretrained(path)`` (full
    fine-tuning or ``merge_lora``) or ``Aligner.from_pretrained(base, adapter=path)`` (LoRA).
    """
    from .model import load_base_model, load_tokenizer, merge_adapter, resolve_base, wrap_lora

    config.validate()
    out = Path(config.output_dir).expanduser()
    if int(os.environ.get("RANK", "0")) == 0:  # under a launcher, rank 0 checks before any rank writes
        check_output(out, config)
    if config.lora and importlib.util.find_spec("peft") is None:
        raise missing("peft", "train", feature="LoRA training (--lora)")
    records = load_records(
        config.data, _fields(config), split=config.dataset_split, config_name=config.dataset_config
    )
    base_location = resolve_base(config) if model is None or tokenizer is None else None
    if tokenizer is None:
        tokenizer = load_tokenizer(base_location, config)  # type: ignore[arg-type]
    data = prepare_data(config, records, tokenizer)

    from .arguments import training_args
    from .collate import CorrectionCollator
    from .hf import MetricsJsonl, StageBoundary, StagedTrainer
    from .stages import StagedDataset, build_stream

    args = training_args(config, out / CHECKPOINTS, has_eval=bool(data.held_out))
    identity_epochs = config.identity_epochs if config.identity_epochs is not None else config.epochs
    stream, stages = build_stream(
        [
            ("identity", len(data.identity), identity_epochs),
            ("correction", len(data.correction), config.epochs),
        ],
        global_batch=config.batch_size * config.gradient_accumulation_steps * args.world_size,
        seed=config.seed,
    )
    run_fingerprint = fingerprint(config, args.world_size, [data.identity, data.correction, data.held_out])
    resume_from = prepare_output(out, config, args, run_fingerprint)

    if model is None:
        model = load_base_model(base_location, config, bf16=args.bf16)  # type: ignore[arg-type]
    if config.lora:
        model = wrap_lora(model, config)
    if config.gradient_checkpointing and hasattr(model, "config"):
        model.config.use_cache = False

    meta = _metadata(config, stages, data)
    trainers: list[Any] = []

    def save_identity(stage: str, step: int) -> None:
        if stage == "identity" and config.save_identity:
            save(
                trainers[0],
                out / IDENTITY_DIR,
                data.template.name,
                {**meta, "stage": "identity", "step": step},
            )

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else data.eos_token_id
    trainer = StagedTrainer(
        model=model,
        args=args,
        data_collator=CorrectionCollator(pad, pad_to_multiple_of=8 if args.bf16 or args.fp16 else None),
        train_dataset=StagedDataset([data.identity, data.correction], stream),
        eval_dataset=[ex.as_features() for ex in data.held_out] or None,
        processing_class=tokenizer,
        callbacks=[
            MetricsJsonl(out / METRICS, stages),
            StageBoundary(stages, evaluate=bool(data.held_out), on_stage_end=save_identity),
        ],
        stages=stages,
        warmup_ratio=config.warmup_ratio,
        lr_kind=config.lr_scheduler,
    )
    trainers.append(trainer)
    result = trainer.train(resume_from_checkpoint=resume_from)

    meta["train"] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    final = {**meta, "stage": "final"}
    if config.merge_lora:
        save(trainer, out / ADAPTER_DIR, data.template.name, final)
        if trainer.is_world_process_zero():
            merge_adapter(trainer.model, base_location, out / ADAPTER_DIR, out, tokenizer, config)
            write_aligner_config(out, template=data.template.name, **final, merged=True)
    else:
        save(trainer, out, data.template.name, final)
    logger.info("trained Aligner written to %s", out)
    return out


def prepare_data(config: TrainConfig, records: list[Record], tokenizer: Any) -> Prepared:
    """Split, slice and tokenize the records; every check that needs no model runs here."""
    if config.eval_data is not None:
        train_records = records
        held_out = load_records(
            config.eval_data, _fields(config), split=config.dataset_split, config_name=config.dataset_config
        )
    else:
        train_records, held_out = split_eval(records, config.eval_fraction, config.seed)
    template = get_template(config.template, tokenizer=tokenizer)
    encoder = ExampleEncoder(tokenizer, template)
    encoder.check_template()
    limits = {"max_length": config.max_length, "policy": config.overlong}
    slice_ = identity_slice(train_records, config.identity_fraction, config.seed)
    identity, id_report = encode_records(encoder, slice_, **limits, what="identity records")
    correction, qac_report = (
        ([], EncodeReport())
        if config.identity_only
        else encode_records(encoder, train_records, **limits, what="training records")
    )
    evaluation, eval_report = encode_records(encoder, held_out, **limits, what="held-out records")
    if not identity and not correction:
        raise TrainingDataError("no training sequence is left after applying max_length: raise --max-length")
    logger.info(
        "%d training records (%d as identity), %d held out; template %r; max_length %d",
        len(train_records),
        len(identity),
        len(evaluation),
        template.name,
        config.max_length,
    )
    reports = {"identity": id_report, "correction": qac_report, "held_out": eval_report}
    return Prepared(template, encoder.eos_token_id, train_records, identity, correction, evaluation, reports)


def _fields(config: TrainConfig) -> Fields:
    return Fields(config.question_field, config.answer_field, config.correction_field)


def _metadata(config: TrainConfig, stages: list[Any], data: Prepared) -> dict[str, Any]:
    """What ``aligner_config.json`` records besides the template."""
    reports = data.reports.values()
    return {
        "base_model": str(config.base_model),
        "trained_with": "llm-aligner",
        "lora": config.lora,
        "stages": [
            {"name": s.name, "records": s.records, "epochs": s.epochs, "steps": s.steps} for s in stages
        ],
        "records": {
            "train": len(data.train_records),
            "identity": len(data.identity),
            "held_out": len(data.held_out),
            "overlong": sum(r.overlong for r in reports),
            "dropped": sum(r.dropped for r in reports),
            "truncated": sum(r.truncated for r in reports),
        },
        "config": config.to_dict(),
    }


__all__ = ["Prepared", "prepare_data", "train_aligner"]
