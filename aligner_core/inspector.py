"""Inspectors: score whether an answer is already aligned, so only the answers that fail are corrected.

"Aligners: Decoupling LLMs and Alignment" (Ngweta et al., 2024) pairs each aligner with an *inspector*, a
small classifier giving a score in [0, 1] (1: aligned). An answer scoring at or above a threshold passes
unchanged and costs no generation. An :class:`Inspector` wraps either a plain callable or a transformers
sequence-classification model (:meth:`Inspector.from_pretrained`); both score many pairs in one call.

Gating the corrector with an inspector (score first, correct only what fails) is ``aligner_core.gating``.
"""

from __future__ import annotations

import asyncio
import json
import math
import numbers
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import InspectorError, ModelLoadError
from .items import as_sequence, question_answer

#: Score at or above which an answer passes unchanged (the paper's 0.5).
DEFAULT_THRESHOLD = 0.5
#: File in a trained inspector's directory recording how it scores (positive label, max length).
INSPECTOR_CONFIG = "inspector_config.json"

#: ``fn(question, answer) -> score`` in [0, 1], 1 meaning aligned.
ScoreFn = Callable[[str, str], float]
#: ``fn([(question, answer), ...]) -> [score, ...]``: one call for many pairs.
BatchScoreFn = Callable[[list[tuple[str, str]]], Sequence[float]]


class Inspector:
    """Scores ``(question, answer)`` pairs in [0, 1]; 1 means the answer is already aligned.

    ``Inspector(fn)`` wraps ``fn(question, answer) -> float``; ``Inspector(fn, batched=True)`` wraps
    ``fn([(question, answer), ...]) -> [float, ...]``, called once per :meth:`score_batch`.
    :meth:`from_pretrained` loads a transformers sequence classifier (e.g. one trained with
    ``aligner train-inspector``). Every score is checked: a real number in [0, 1], else ``InspectorError``.
    An ``Inspector`` is itself a ``(question, answer) -> float`` callable.
    """

    def __init__(self, fn: ScoreFn | BatchScoreFn, *, batched: bool = False, name: str | None = None) -> None:
        if isinstance(fn, Inspector):
            raise TypeError("fn is already an Inspector: use it as it is (or as_inspector(obj))")
        if not callable(fn):
            raise TypeError(
                f"an inspector must be callable (question, answer) -> float, got {type(fn).__name__}"
            )
        self._fn = fn
        self.batched = batched
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__

    def __repr__(self) -> str:
        return f"Inspector(name={self.name!r}, batched={self.batched})"

    def __call__(self, question: str, answer: str) -> float:
        return self.score(question, answer)

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str],
        *,
        device: str | None = None,
        device_map: Any = None,
        dtype: Any = "auto",
        max_length: int | None = None,
        batch_size: int = 32,
        positive_label: int | str | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        revision: str | None = None,
    ) -> Inspector:
        """Load a sequence classifier (hub id or local directory) with ``AutoModelForSequenceClassification``.

        ``positive_label`` names the class meaning "aligned" (an index or a label of ``config.id2label``);
        by default the one recorded by ``aligner train-inspector``, else index 1 (or the single logit,
        through a sigmoid, of a one-output model). ``max_length`` (default: recorded, else 512) truncates
        long pairs; ``batch_size`` pairs go through the model per forward pass.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .loading import dedupe_library_logs, load_error, resolve_device, resolve_dtype, resolve_source

        if device is not None and device_map is not None:
            raise ModelLoadError("pass either device or device_map, not both")
        dedupe_library_logs()
        source = resolve_source(model)
        if source.kind == "gguf":
            raise ModelLoadError(
                f"{os.fspath(model)} is a GGUF file: an inspector loads a sequence-classification "
                "model directory or hub id (train one with `aligner train-inspector`)"
            )
        recorded = read_inspector_config(source.location) if source.kind == "dir" else {}
        target = resolve_device(device) if device_map is None else None
        kwargs: dict[str, Any] = {
            "dtype": resolve_dtype(dtype, target or "cuda"),
            "trust_remote_code": trust_remote_code,
        }
        if revision is not None:
            kwargs["revision"] = revision
        if not allow_pickle:
            kwargs["use_safetensors"] = True
        if device_map is not None:
            kwargs["device_map"] = device_map
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source.location,
                trust_remote_code=trust_remote_code,
                **({"revision": revision} if revision is not None else {}),
            )
            loaded = AutoModelForSequenceClassification.from_pretrained(source.location, **kwargs)
        except (OSError, ValueError) as exc:
            raise load_error(source, exc) from exc
        if target is not None:
            loaded = loaded.to(target)
        return cls.from_model(
            loaded,
            tokenizer,
            max_length=max_length if max_length is not None else int(recorded.get("max_length", 512)),
            batch_size=batch_size,
            positive_label=positive_label if positive_label is not None else recorded.get("positive_label"),
            name=source.name,
        )

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        max_length: int = 512,
        batch_size: int = 32,
        positive_label: int | str | None = None,
        name: str | None = None,
    ) -> Inspector:
        """Wrap a sequence-classification model and its tokenizer that are already loaded."""
        scorer = SequenceClassifier(
            model, tokenizer, max_length=max_length, batch_size=batch_size, positive_label=positive_label
        )
        return cls(
            scorer,
            batched=True,
            name=name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        )

    # -- scoring ------------------------------------------------------------------------------

    def score(self, question: str, answer: str) -> float:
        """The score of one pair, in [0, 1]."""
        return self.score_batch([(question, answer)])[0]

    def score_batch(self, pairs: Sequence[Any]) -> list[float]:
        """One score per pair (``(question, answer)`` tuples or dicts), in input order; a batched inspector is
        called once."""
        checked = [question_answer(p, i) for i, p in enumerate(as_sequence(pairs))]
        if not checked:
            return []
        if self.batched:
            raw = self._fn(checked)  # type: ignore[call-arg,arg-type]
            if hasattr(raw, "tolist"):  # numpy arrays, tensors
                raw = raw.tolist()
            if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
                raise InspectorError(
                    f"inspector {self.name!r} must return a sequence of scores for a batch, "
                    f"got {type(raw).__name__}"
                )
            if len(raw) != len(checked):
                raise InspectorError(
                    f"inspector {self.name!r} returned {len(raw)} scores for {len(checked)} pairs"
                )
        else:
            raw = [self._fn(q, a) for q, a in checked]  # type: ignore[call-arg]
        return [check_score(value, i, self.name) for i, value in enumerate(raw)]

    async def ascore(self, question: str, answer: str) -> float:
        """Async :meth:`score` (in a worker thread, so the event loop is never blocked)."""
        return (await self.ascore_batch([(question, answer)]))[0]

    async def ascore_batch(self, pairs: Sequence[Any]) -> list[float]:
        """Async :meth:`score_batch` (in a worker thread)."""
        return await asyncio.to_thread(self.score_batch, pairs)


class SequenceClassifier:
    """A transformers sequence classifier as a batched scorer: the probability of the positive label.

    Pairs are encoded as the tokenizer's text pairs (``tokenizer(questions, answers)``, as training does),
    sorted by length so each padded batch holds similar lengths (longest first: running out of memory shows
    at once), and scored under ``torch.inference_mode`` in batches of ``batch_size``. A lock makes one
    instance safe to share between threads.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_length: int = 512,
        batch_size: int = 32,
        positive_label: int | str | None = None,
    ) -> None:
        for what, value in (("max_length", max_length), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.index, self.sigmoid = resolve_positive_label(model.config, positive_label)
        if tokenizer.pad_token_id is None:  # decoder-only tokenizers often have none; batches need one
            if tokenizer.eos_token is None:
                raise ModelLoadError(
                    "the inspector's tokenizer has neither a pad nor an EOS token to pad batches with"
                )
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = (
                tokenizer.pad_token_id
            )  # where decoder classifiers find the last token
        self._lock = threading.Lock()

    def __call__(self, pairs: list[tuple[str, str]]) -> list[float]:
        import torch

        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        scores = [0.0] * len(pairs)
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            with (
                self._lock,
                torch.inference_mode(),
            ):  # a fast tokenizer's padding state is not thread-safe either
                encoded = self.tokenizer(
                    [pairs[i][0] for i in chunk],
                    [pairs[i][1] for i in chunk],
                    truncation=True,
                    max_length=self.max_length,
                    padding=True,
                    return_tensors="pt",
                ).to(device)
                logits = self.model(**encoded).logits.float()
            probs = (
                torch.sigmoid(logits[:, self.index])
                if self.sigmoid
                else torch.softmax(logits, -1)[:, self.index]
            )
            for i, p in zip(chunk, probs.tolist()):
                scores[i] = p
        return scores


def resolve_positive_label(config: Any, positive_label: int | str | None) -> tuple[int, bool]:
    """``(logit index, sigmoid?)`` of the class meaning "aligned" in a classifier's ``config``."""
    n = int(getattr(config, "num_labels", 2))
    sigmoid = n == 1 or getattr(config, "problem_type", None) == "multi_label_classification"
    if positive_label is None:
        return (0 if n == 1 else 1), sigmoid
    if isinstance(positive_label, str):
        label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
        if positive_label not in label2id:
            raise InspectorError(
                f"positive_label {positive_label!r} is not a label of this model; it has "
                f"{', '.join(map(repr, label2id)) or 'none'}"
            )
        return label2id[positive_label], sigmoid
    if isinstance(positive_label, bool) or not isinstance(positive_label, int) or not 0 <= positive_label < n:
        raise InspectorError(
            f"positive_label must be a label name or an index in [0, {n}), got {positive_label!r}"
        )
    return positive_label, sigmoid


def read_inspector_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``aligner train-inspector`` recorded in ``directory`` (empty when nothing was)."""
    f = Path(directory) / INSPECTOR_CONFIG
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{f} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def as_inspector(obj: Inspector | ScoreFn) -> Inspector:
    """``obj`` as an :class:`Inspector`: an Inspector as it is, a ``(question, answer) -> float`` callable wrapped."""
    if isinstance(obj, Inspector):
        return obj
    if callable(obj):
        return Inspector(obj)
    raise TypeError(
        f"inspector must be an Inspector or a callable (question, answer) -> float, got {type(obj).__name__}"
    )


# -- checks ------------------------------------------------------------------------------------


def check_score(value: Any, index: int = 0, name: str = "inspector") -> float:
    """``value`` as a float in [0, 1], else ``InspectorError`` naming the pair and what came back."""
    if hasattr(value, "item") and not isinstance(value, numbers.Number):  # 0-d tensors and arrays
        value = value.item()
    if isinstance(value, bool):
        raise InspectorError(
            f"inspector {name!r} returned {value!r} for pair {index}: return a score in [0, 1] where 1 means "
            "aligned (a boolean is ambiguous: older gates returned True for 'needs correcting')"
        )
    if (
        not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or not 0.0 <= float(value) <= 1.0
    ):
        raise InspectorError(
            f"inspector {name!r} returned {value!r} for pair {index}: scores must be numbers in [0, 1]"
        )
    return float(value)


def check_threshold(threshold: Any) -> float:
    """``threshold`` as a float in [0, 1], else ``InspectorError``."""
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, numbers.Real)
        or not 0.0 <= float(threshold) <= 1.0
    ):
        raise InspectorError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return float(threshold)


def passes(score: float, threshold: float) -> bool:
    """An answer passes unchanged when its score is at or above the threshold."""
    return score >= threshold


__all__ = [
    "DEFAULT_THRESHOLD",
    "INSPECTOR_CONFIG",
    "BatchScoreFn",
    "Inspector",
    "InspectorError",
    "ScoreFn",
    "SequenceClassifier",
    "as_inspector",
    "check_score",
    "check_threshold",
    "passes",
    "read_inspector_config",
]
