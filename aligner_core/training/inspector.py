"""Train an inspector: a transformers sequence classifier scoring whether an answer is aligned.

``train_inspector(InspectorConfig(data=..., base_model=..., output_dir=...)) -> Path``; the same from the
shell as ``aligner train-inspector DATA --base-model M --output DIR``. Records are ``{question, answer,
label}`` (label 1: aligned, 0: not), or correction records ``{question, answer, correction}``, each giving
two examples: the answer labelled 0 and the correction labelled 1 (one example labelled 1 when they are
the same text: an answer that needed no correction is aligned). The output loads with
``Inspector.from_pretrained(DIR)``.

As for ``train_aligner``, every record is checked before a model loads, and a bad one is named by where it
is (``line 7``); the ``Trainer`` does the rest. Held-out records (``eval_data`` or ``eval_fraction``, split by
record so a correction's two examples stay on one side) get the eval loss, accuracy and ROC AUC.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..inspector import INSPECTOR_CONFIG
from .config import DTYPES, TrainConfigError, _fraction, _opt, _positive_int, _req, check_locations
from .data import TrainingDataError, iter_raw, problems_message

logger = logging.getLogger("aligner_core.training")

#: Label names the trained classifier records: index 1 is the score an ``Inspector`` returns.
LABELS = {0: "misaligned", 1: "aligned"}
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


@dataclass
class InspectorConfig:
    """Settings of ``train_inspector``; ``aligner train-inspector --help`` lists the same fields."""

    data: str | os.PathLike[str] | Sequence[Mapping[str, Any]] = _req(
        "Records: {question, answer, label} (label 1 = aligned, 0 = not) or {question, answer, correction} "
        "(answer -> 0, correction -> 1), as a .jsonl/.json/.csv/.parquet file, a datasets folder or name, or "
        "(from Python) a list of dicts.",
        argument=True,
        cli_type=str,
    )
    base_model: str = _req(
        "Model to start from: hub id or local directory (a classification head is added).",
        "--base-model",
        "-m",
    )
    output_dir: str = _req("Directory to write the trained inspector into.", "--output", "-o")
    question_field: str = _opt("question", "Record field holding the question.")
    answer_field: str = _opt("answer", "Record field holding the answer.")
    label_field: str = _opt("label", "Record field holding the label (1 aligned, 0 not).")
    correction_field: str = _opt(
        "correction", "Record field holding a correction (used when there is no label)."
    )
    dataset_split: str = _opt(
        "train", "Split to read when DATA is a `datasets` name or directory.", "--split"
    )
    dataset_config: str | None = _opt(None, "Configuration name when DATA is a `datasets` name.")
    eval_data: str | None = _opt(
        None, "Held-out records (same formats as DATA) for eval loss, accuracy and AUC."
    )
    eval_fraction: float = _opt(0.0, "Fraction of DATA's records held out (instead of --eval-data).")
    max_length: int = _opt(512, "Longest input (question + answer) in tokens; longer pairs are truncated.")
    epochs: float = _opt(3.0, "Training epochs.")
    max_steps: int = _opt(-1, "Stop after this many optimizer steps (a smoke test); -1: run all epochs.")
    learning_rate: float = _opt(2e-5, "Peak learning rate.", "--lr", "--learning-rate")
    lr_scheduler: str = _opt("linear", "Learning-rate schedule: linear, cosine or constant.", "--scheduler")
    warmup_ratio: float = _opt(0.06, "Linear warm-up, as a fraction of the steps.")
    weight_decay: float = _opt(0.01, "AdamW weight decay.")
    batch_size: int = _opt(16, "Per-device training batch size.", "--batch-size")
    gradient_accumulation_steps: int = _opt(
        1, "Micro-batches accumulated per optimizer step.", "--grad-accum"
    )
    seed: int = _opt(42, "Seed for the split, the shuffling and the new classification head.")
    bf16: bool | None = _opt(
        None, "bf16 mixed precision (default: on where the GPU supports it).", "--bf16/--no-bf16"
    )
    dtype: str = _opt("auto", "Weights dtype when loading: auto (float32), float32, bfloat16, float16.")
    trust_remote_code: bool = _opt(False, "Allow model code from the model repository.")
    allow_pickle: bool = _opt(False, "Allow pickle (.bin) weights, which can run code when loaded.")
    logging_steps: int = _opt(10, "Log the training loss every N steps (to metrics.jsonl and reporters).")
    overwrite: bool = _opt(False, "Write into OUTPUT even if it holds an earlier inspector.")
    report_to: str = _opt(
        "auto", "Where metrics go besides metrics.jsonl: auto, none, or a comma-separated list."
    )
    progress: bool = _opt(True, "Show a progress bar.", "--progress/--no-progress")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``TrainConfigError`` naming the setting and the value received."""
        check_locations(self)
        _fraction("eval_fraction", self.eval_fraction, upper_inclusive=False)
        _fraction("warmup_ratio", self.warmup_ratio, upper_inclusive=False)
        for name in ("max_length", "batch_size", "gradient_accumulation_steps", "logging_steps"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.max_steps, int) or self.max_steps == 0 or self.max_steps < -1:
            raise TrainConfigError(
                f"max_steps must be a positive integer or -1 (all epochs), got {self.max_steps!r}"
            )
        for name in ("epochs", "learning_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise TrainConfigError(f"{name} must be a positive number, got {value!r}")
        if self.weight_decay < 0:
            raise TrainConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.lr_scheduler not in ("linear", "cosine", "constant"):
            raise TrainConfigError(
                f"lr_scheduler must be one of linear, cosine, constant; got {self.lr_scheduler!r}"
            )
        if self.dtype not in DTYPES:
            raise TrainConfigError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.eval_data is not None and self.eval_fraction > 0:
            raise TrainConfigError("pass eval_data or eval_fraction, not both")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values (a list of records is summarised by its length)."""
        values = asdict(self)
        if not isinstance(self.data, (str, bytes, os.PathLike)):
            values["data"] = f"<{len(self.data)} records>"
        for name in ("data", "base_model", "output_dir"):
            if isinstance(values[name], os.PathLike):
                values[name] = os.fspath(values[name])
        return values


@dataclass(frozen=True)
class LabelledPair:
    """One classification example; ``group`` ties the two examples of a correction record together."""

    question: str
    answer: str
    label: int
    where: str
    group: int


# -- records -----------------------------------------------------------------------------------


def load_labelled(source: Any, config: InspectorConfig, *, what: str = "the data") -> list[LabelledPair]:
    """Every example of ``source``; ``TrainingDataError`` lists all records that cannot be used."""
    raw = list(iter_raw(source, split=config.dataset_split, config_name=config.dataset_config))
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else what
    if not raw:
        raise TrainingDataError(f"{name} holds no records")
    examples: list[LabelledPair] = []
    problems: list[str] = []
    for group, (where, item) in enumerate(raw):
        result = labelled(item, where, group, config)
        if isinstance(result, str):
            problems.append(result)
        else:
            examples.extend(result)
    if problems:
        raise TrainingDataError(
            problems_message(f"{name} has records an inspector cannot be trained on", problems)
        )
    return examples


def labelled(item: Any, where: str, group: int, config: InspectorConfig) -> list[LabelledPair] | str:
    """The examples of one raw record, or a message saying what is wrong with it."""
    q_key, a_key, l_key, c_key = (
        config.question_field,
        config.answer_field,
        config.label_field,
        config.correction_field,
    )
    if isinstance(item, Exception):
        return str(item)
    if not isinstance(item, Mapping):
        return f"{where}: expected an object with {q_key!r}, {a_key!r} and {l_key!r} (or {c_key!r}), got {type(item).__name__}"
    absent = [repr(k) for k in (q_key, a_key) if k not in item]
    if l_key not in item and c_key not in item:
        absent.append(f"{l_key!r} (or {c_key!r})")
    if absent:
        present = ", ".join(sorted(map(str, item))) or "none"
        return f"{where}: missing field{'s' if len(absent) > 1 else ''} {', '.join(absent)} (has: {present})"
    q, a = item[q_key], item[a_key]
    wrong = [f"{k!r} is {type(v).__name__}" for k, v in ((q_key, q), (a_key, a)) if not isinstance(v, str)]
    if wrong:
        return f"{where}: fields must be strings: {', '.join(wrong)}"
    if not a.strip():
        return f"{where}: empty {a_key!r}: nothing to classify"
    if l_key in item:
        label = parse_label(item[l_key])
        if label is None:
            return f"{where}: {l_key!r} must be 0 or 1 (or true/false), got {item[l_key]!r}"
        return [LabelledPair(q, a, label, where, group)]
    c = item[c_key]
    if not isinstance(c, str) or not c.strip():
        return f"{where}: {c_key!r} must be a non-empty string, got {c!r}"
    if c.strip() == a.strip():  # an answer that needed no correction is an aligned one
        return [LabelledPair(q, a, 1, where, group)]
    return [LabelledPair(q, a, 0, where, group), LabelledPair(q, c, 1, f"{where} ({c_key})", group)]


def parse_label(value: Any) -> int | None:
    """0 or 1 from ints, bools, 0.0/1.0 and the strings CSV files hold; None for anything else."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str):
        return {"0": 0, "1": 1, "false": 0, "true": 1}.get(value.strip().lower())
    return None


def split_groups(
    examples: list[LabelledPair], fraction: float, seed: int
) -> tuple[list[LabelledPair], list[LabelledPair]]:
    """``(train, held_out)``: a seeded random ``fraction`` of the records (both examples of one together)."""
    if fraction <= 0:
        return examples, []
    groups = sorted({e.group for e in examples})
    n_eval = max(1, round(len(groups) * fraction))
    if n_eval >= len(groups):
        raise TrainingDataError(
            f"eval_fraction={fraction} of {len(groups)} records leaves nothing to train on"
        )
    held = set(random.Random(seed).sample(groups, n_eval))
    return [e for e in examples if e.group not in held], [e for e in examples if e.group in held]


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve from ranks (ties share their mean rank); None without both classes."""
    n_pos = sum(1 for y in labels if y == 1)
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    pos_ranks = sum(r for r, y in zip(ranks, labels) if y == 1)
    return (pos_ranks - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


# -- the run -------------------------------------------------------------------------------------


def check_inspector_output(out: Path, overwrite: bool) -> None:
    """Refuse to write over an earlier inspector (or anything that is not a folder) unless told to."""
    if out.exists() and not out.is_dir():
        raise TrainConfigError(f"output_dir {out} exists and is not a directory")
    earlier = [
        n for n in (INSPECTOR_CONFIG, "config.json", "model.safetensors", METRICS) if (out / n).exists()
    ]
    if earlier and not overwrite:
        raise TrainConfigError(
            f"{out} already holds a model ({', '.join(earlier)}): pass overwrite=True (--overwrite) "
            "to replace it, or pick another output directory"
        )
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise TrainConfigError(f"cannot create {out}: {parent} is not a writable folder")


def train_inspector(config: InspectorConfig, *, model: Any = None, tokenizer: Any = None) -> Path:
    """Fine-tune a sequence classifier as ``config`` says and return the output directory.

    ``model``/``tokenizer`` may be given as loaded objects (a ``...ForSequenceClassification`` with two
    labels); ``config.base_model`` then only names the base in the recorded metadata.
    """
    config.validate()
    out = Path(config.output_dir).expanduser()
    check_inspector_output(out, config.overwrite)
    examples = load_labelled(config.data, config)
    if config.eval_data is not None:
        train, held_out = examples, load_labelled(config.eval_data, config)
    else:
        train, held_out = split_groups(examples, config.eval_fraction, config.seed)
    if len({e.label for e in train}) < 2:
        raise TrainingDataError(
            f"every training example is labelled {train[0].label}: an inspector needs examples "
            "of both aligned (1) and misaligned (0) answers"
        )
    if model is None or tokenizer is None:
        model, tokenizer = _load(config, model, tokenizer)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer of {config.base_model!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if int(getattr(model.config, "num_labels", 0)) != len(LABELS):
        raise TrainConfigError(
            f"the model has {getattr(model.config, 'num_labels', None)} labels; an inspector is "
            "trained as a two-label classifier (num_labels=2)"
        )

    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback

    train_set, eval_set = _encode(tokenizer, train, config), _encode(tokenizer, held_out, config)
    logger.info(
        "training an inspector on %d examples (%d aligned), %d held out",
        len(train_set),
        sum(e.label for e in train),
        len(eval_set),
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS).unlink(missing_ok=True)

    class Metrics(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            if state.is_world_process_zero and logs:
                with open(out / METRICS, "a", encoding="utf-8") as f:
                    f.write(
                        json.dumps(
                            {"step": state.global_step, "epoch": state.epoch, **logs, "time": time.time()},
                            default=float,
                        )
                        + "\n"
                    )

    trainer = Trainer(
        model=model,
        args=_training_args(config, out / CHECKPOINTS, has_eval=bool(eval_set)),
        train_dataset=train_set,
        eval_dataset=eval_set or None,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=_metrics,
        callbacks=[Metrics()],
    )
    result = trainer.train()
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    if eval_set:
        metrics.update({k: v for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        record = {
            "positive_label": LABELS[1],
            "labels": LABELS,
            "max_length": config.max_length,
            "base_model": str(config.base_model),
            "trained_with": "llm-aligner",
            "examples": {"train": len(train_set), "held_out": len(eval_set)},
            "metrics": metrics,
            "config": config.to_dict(),
        }
        (out / INSPECTOR_CONFIG).write_text(
            json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8"
        )
    logger.info("trained inspector written to %s", out)
    return out


def _load(config: InspectorConfig, model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """The base as a two-label sequence classifier (a fresh head on a causal LM or an encoder) and its tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..loading import dequantize_gguf, load_error, resolve_source

    source = resolve_source(config.base_model)
    location = source.location
    if source.kind == "gguf":
        location = str(dequantize_gguf(source, trust_remote_code=config.trust_remote_code))
    try:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=config.trust_remote_code)
        if model is None:
            dtype = torch.float32 if config.dtype == "auto" else getattr(torch, config.dtype)
            model = AutoModelForSequenceClassification.from_pretrained(
                location,
                num_labels=len(LABELS),
                id2label=LABELS,
                label2id={v: k for k, v in LABELS.items()},
                dtype=dtype,
                trust_remote_code=config.trust_remote_code,
                **({} if config.allow_pickle else {"use_safetensors": True}),
            )
    except (OSError, ValueError) as exc:
        raise load_error(source, exc) from exc
    return model, tokenizer


def _encode(tokenizer: Any, examples: list[LabelledPair], config: InspectorConfig) -> list[dict[str, Any]]:
    """Text pairs as the ``Inspector`` encodes them at inference: ``tokenizer(question, answer)``, truncated."""
    if not examples:
        return []
    enc = tokenizer(
        [e.question for e in examples],
        [e.answer for e in examples],
        truncation=True,
        max_length=config.max_length,
    )
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": e.label}
        for ids, mask, e in zip(enc["input_ids"], enc["attention_mask"], examples)
    ]


def _metrics(prediction: Any) -> dict[str, float]:
    import numpy as np

    logits, labels = prediction.predictions, prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    scores = (shifted / shifted.sum(-1, keepdims=True))[:, 1]
    result = {"accuracy": float(((scores >= 0.5).astype(int) == labels).mean())}
    auc = roc_auc(labels.tolist(), scores.tolist())
    if auc is not None:
        result["auc"] = auc
    return result


def _training_args(config: InspectorConfig, checkpoints: Path, *, has_eval: bool) -> Any:
    import dataclasses

    import torch
    from transformers import TrainingArguments

    from .arguments import report_to

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    bf16 = (
        config.bf16
        if config.bf16 is not None
        else bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    )
    kwargs: dict[str, Any] = dict(
        output_dir=str(checkpoints),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        bf16=bf16,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        eval_strategy="epoch" if has_eval else "no",
        report_to=report_to(config.report_to),
        disable_tqdm=not config.progress,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    # transformers 5 folded warmup_ratio into warmup_steps (a float below 1 is a ratio)
    kwargs["warmup_ratio" if "warmup_ratio" in known else "warmup_steps"] = config.warmup_ratio
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in known and v is not None})


__all__ = [
    "InspectorConfig",
    "LabelledPair",
    "load_labelled",
    "parse_label",
    "roc_auc",
    "split_groups",
    "train_inspector",
]
