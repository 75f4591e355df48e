"""Inspectors: score whether an answer is already aligned, so only the answers that fail are corrected.

"Aligners: Decoupling LLMs and Alignment" (Ngweta et al., 2024) pairs each aligner with an *inspector*, a
small classifier giving a score in [0, 1] (1: aligned). An answer scoring at or above a threshold passes
unchanged and costs no generation. An :class:`Inspector` wraps either a plain callable or a transformers
sequence-classification model (:meth:`Inspector.from_pretrained`); both score many pairs in one call.

The gating helpers at the bottom (:func:`correct_gated`, :func:`correct_batch_gated` and their async twins)
are what ``Aligner(..., inspector=...)`` and the adapters call: score first, in one batch, then hand only the
failing pairs to the corrector, and put the passed ones back in place as unchanged ``Correction`` objects.
"""

from __future__ import annotations

import asyncio
import json
import math
import numbers
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .correction import Correction
from .errors import InspectorError, InvalidInputError, ModelLoadError

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
            raise TypeError(f"an inspector must be callable (question, answer) -> float, got {type(fn).__name__}")
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

        from .loading import _load_error, dedupe_library_logs, resolve_device, resolve_dtype, resolve_source

        if device is not None and device_map is not None:
            raise ModelLoadError("pass either device or device_map, not both")
        dedupe_library_logs()
        source = resolve_source(model)
        if source.kind == "gguf":
            raise ModelLoadError(f"{os.fspath(model)} is a GGUF file: an inspector loads a sequence-classification "
                                 "model directory or hub id (train one with `aligner train-inspector`)")
        recorded = read_inspector_config(source.location) if source.kind == "dir" else {}
        target = resolve_device(device) if device_map is None else None
        kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, target or "cuda"), "trust_remote_code": trust_remote_code}
        if revision is not None:
            kwargs["revision"] = revision
        if not allow_pickle:
            kwargs["use_safetensors"] = True
        if device_map is not None:
            kwargs["device_map"] = device_map
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source.location, trust_remote_code=trust_remote_code,
                **({"revision": revision} if revision is not None else {}),
            )
            loaded = AutoModelForSequenceClassification.from_pretrained(source.location, **kwargs)
        except (OSError, ValueError) as exc:
            raise _load_error(source, exc) from exc
        if target is not None:
            loaded = loaded.to(target)
        return cls.from_model(
            loaded, tokenizer,
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
        scorer = SequenceClassifier(model, tokenizer, max_length=max_length, batch_size=batch_size,
                                    positive_label=positive_label)
        return cls(scorer, batched=True, name=name or getattr(model.config, "_name_or_path", "") or type(model).__name__)

    # -- scoring ------------------------------------------------------------------------------

    def score(self, question: str, answer: str) -> float:
        """The score of one pair, in [0, 1]."""
        return self.score_batch([(question, answer)])[0]

    def score_batch(self, pairs: Sequence[Any]) -> list[float]:
        """One score per pair (``(question, answer)`` tuples or dicts), in input order; a batched inspector is
        called once."""
        checked = [question_answer(p, i) for i, p in enumerate(_sequence(pairs))]
        if not checked:
            return []
        if self.batched:
            raw = self._fn(checked)  # type: ignore[call-arg,arg-type]
            if hasattr(raw, "tolist"):  # numpy arrays, tensors
                raw = raw.tolist()
            if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
                raise InspectorError(f"inspector {self.name!r} must return a sequence of scores for a batch, "
                                     f"got {type(raw).__name__}")
            if len(raw) != len(checked):
                raise InspectorError(f"inspector {self.name!r} returned {len(raw)} scores for {len(checked)} pairs")
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
        self, model: Any, tokenizer: Any, *, max_length: int = 512, batch_size: int = 32,
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
                raise ModelLoadError("the inspector's tokenizer has neither a pad nor an EOS token to pad batches with")
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # where decoder classifiers find the last token
        self._lock = threading.Lock()

    def __call__(self, pairs: list[tuple[str, str]]) -> list[float]:
        import torch

        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        scores = [0.0] * len(pairs)
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            with self._lock, torch.inference_mode():  # a fast tokenizer's padding state is not thread-safe either
                encoded = self.tokenizer(
                    [pairs[i][0] for i in chunk], [pairs[i][1] for i in chunk],
                    truncation=True, max_length=self.max_length, padding=True, return_tensors="pt",
                ).to(device)
                logits = self.model(**encoded).logits.float()
            probs = torch.sigmoid(logits[:, self.index]) if self.sigmoid else torch.softmax(logits, -1)[:, self.index]
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
            raise InspectorError(f"positive_label {positive_label!r} is not a label of this model; it has "
                                 f"{', '.join(map(repr, label2id)) or 'none'}")
        return label2id[positive_label], sigmoid
    if isinstance(positive_label, bool) or not isinstance(positive_label, int) or not 0 <= positive_label < n:
        raise InspectorError(f"positive_label must be a label name or an index in [0, {n}), got {positive_label!r}")
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
    if not isinstance(value, numbers.Real) or not math.isfinite(float(value)) or not 0.0 <= float(value) <= 1.0:
        raise InspectorError(f"inspector {name!r} returned {value!r} for pair {index}: scores must be numbers in [0, 1]")
    return float(value)


def check_threshold(threshold: Any) -> float:
    """``threshold`` as a float in [0, 1], else ``InspectorError``."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 <= float(threshold) <= 1.0:
        raise InspectorError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return float(threshold)


def passes(score: float, threshold: float) -> bool:
    """An answer passes unchanged when its score is at or above the threshold."""
    return score >= threshold


def question_answer(pair: Any, index: int = 0) -> tuple[str, str]:
    """``(question, answer)`` of a batch item: a dict with those keys or a tuple (a third element, the
    history, is ignored), both strings."""
    if isinstance(pair, Mapping):
        if "question" not in pair or "answer" not in pair:
            raise InvalidInputError(f"pair {index}: a dict pair needs 'question' and 'answer' keys, got {sorted(pair)}")
        q, a = pair["question"], pair["answer"]
    elif isinstance(pair, (tuple, list)) and len(pair) in (2, 3):
        q, a = pair[0], pair[1]
    else:
        raise InvalidInputError(f"pair {index}: expected a (question, answer) tuple or a dict, got {type(pair).__name__}")
    for field, value in (("question", q), ("answer", a)):
        if not isinstance(value, str):
            raise InvalidInputError(f"pair {index}: {field} must be a str, got {type(value).__name__}")
    return q, a


def _sequence(pairs: Any) -> Sequence[Any]:
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise InvalidInputError(f"pairs must be a sequence of (question, answer) pairs, got {type(pairs).__name__}")
    return pairs


def _scoreable(pair: Any) -> tuple[str, str] | None:
    """The pair's texts as the inspector judges them, else None (the corrector reports its own error). The
    inspector sees what the answer was grounded on: a pair's ``context`` is folded into the question as the
    official templates fold it (``history.fold_history``)."""
    try:
        q, a = question_answer(pair)
    except InvalidInputError:
        return None
    if not a.strip():
        return None
    if isinstance(pair, Mapping) and pair.get("context"):
        from .context import normalize_context
        from .history import fold_history

        try:
            q = fold_history(q, (), normalize_context(pair["context"]))
        except InvalidInputError:
            return None
    return q, a


# -- the gate the facade and the adapters call -----------------------------------------------------


def passed_correction(
    question: str, answer: str, score: float, *, threshold: float = DEFAULT_THRESHOLD,
    metadata: Mapping[str, Any] | None = None,
) -> Correction:
    """The result for an answer that passed the inspector: the answer itself, unchanged, no tokens generated
    (``skipped: "inspector_passed"``, as every answer passed through says why)."""
    from .decision import DETAILS, Skip, passed

    reason = {"skipped": Skip.INSPECTOR_PASSED.value, "skipped_detail": DETAILS[Skip.INSPECTOR_PASSED]}
    return passed(question, answer, {**(metadata or {}), **_verdict(score, threshold, passed=True), **reason})


def inspected(correction: Correction, score: float, *, threshold: float = DEFAULT_THRESHOLD) -> Correction:
    """``correction`` (of an answer that failed the inspector) with the inspector's verdict in its metadata."""
    return replace(correction, metadata={**correction.metadata, **_verdict(score, threshold, passed=False)})


def _verdict(score: float, threshold: float, *, passed: bool) -> dict[str, Any]:
    return {"inspected": True, "inspector_score": score, "inspector_threshold": threshold, "inspector_passed": passed}


@dataclass(frozen=True)
class Gate:
    """The inspector's verdict on a batch: one score per pair (None where it could not judge the pair)."""

    scores: list[float | None]
    threshold: float

    @property
    def passed(self) -> list[int]:
        """Indices of the pairs that pass unchanged."""
        return [i for i, s in enumerate(self.scores) if s is not None and passes(s, self.threshold)]

    @property
    def failing(self) -> list[int]:
        """Indices of the pairs to correct (those the inspector could not judge included, in input order)."""
        return [i for i, s in enumerate(self.scores) if s is None or not passes(s, self.threshold)]


def gate(inspector: Inspector | ScoreFn, pairs: Sequence[Any], threshold: float = DEFAULT_THRESHOLD) -> Gate:
    """Score every pair the inspector can judge in one batch. Pairs it cannot (not strings, empty answer,
    malformed) get ``None``: they go on to the corrector, which raises or reports them as it always does."""
    inspector, threshold = as_inspector(inspector), check_threshold(threshold)
    texts = [_scoreable(p) for p in _sequence(pairs)]
    judged = [i for i, t in enumerate(texts) if t is not None]
    scores: list[float | None] = [None] * len(texts)
    for i, s in zip(judged, inspector.score_batch([texts[i] for i in judged])):
        scores[i] = s
    return Gate(scores, threshold)


async def agate(inspector: Inspector | ScoreFn, pairs: Sequence[Any], threshold: float = DEFAULT_THRESHOLD) -> Gate:
    """Async :func:`gate` (scored in a worker thread)."""
    return await asyncio.to_thread(gate, inspector, pairs, threshold)


def merge_verdict(
    pairs: Sequence[Any], verdict: Gate, corrected: Sequence[Any], metadata: Mapping[str, Any] | None = None
) -> list[Any]:
    """Results in input order: ``corrected`` (one per failing pair) with the verdict added, passed pairs as unchanged
    corrections carrying ``metadata``."""
    failing = verdict.failing
    if len(corrected) != len(failing):
        raise RuntimeError(f"the corrector returned {len(corrected)} results for {len(failing)} pairs")
    results: list[Any] = [None] * len(pairs)
    for i, out in zip(failing, corrected):
        score = verdict.scores[i]
        results[i] = inspected(out, score, threshold=verdict.threshold) if (
            score is not None and isinstance(out, Correction)) else out
    for i in verdict.passed:
        q, a = question_answer(pairs[i], i)
        results[i] = passed_correction(q, a, verdict.scores[i], threshold=verdict.threshold, metadata=metadata)  # type: ignore[arg-type]
    return results


def correct_batch_gated(
    pairs: Sequence[Any],
    inspector: Inspector | ScoreFn,
    threshold: float,
    correct_batch: Callable[[list[Any]], Sequence[Any]],
    *,
    metadata: Mapping[str, Any] | None = None,
) -> list[Any]:
    """Score all pairs in one batch, call ``correct_batch`` once on the failing pairs only (as given: tuples,
    dicts, history and all), and return results in input order: passed pairs as unchanged ``Correction``
    objects carrying ``metadata`` (e.g. the template and engine names) and the verdict, corrected ones with
    the verdict added. Whatever ``correct_batch`` returns for a pair that is not a ``Correction`` (an
    exception under ``return_exceptions=True``) is kept in place."""
    verdict = gate(inspector, pairs, threshold)
    failing = verdict.failing
    corrected = correct_batch([pairs[i] for i in failing]) if failing else []
    return merge_verdict(pairs, verdict, corrected, metadata)


async def acorrect_batch_gated(
    pairs: Sequence[Any],
    inspector: Inspector | ScoreFn,
    threshold: float,
    acorrect_batch: Callable[[list[Any]], Awaitable[Sequence[Any]]],
    *,
    metadata: Mapping[str, Any] | None = None,
) -> list[Any]:
    """Async :func:`correct_batch_gated`: scores in a worker thread, then awaits ``acorrect_batch`` on the failing pairs."""
    verdict = await agate(inspector, pairs, threshold)
    failing = verdict.failing
    corrected = await acorrect_batch([pairs[i] for i in failing]) if failing else []
    return merge_verdict(pairs, verdict, corrected, metadata)


def _pair(question: Any, answer: Any, context: Any) -> Any:
    return {"question": question, "answer": answer, "context": context} if context else (question, answer)


def correct_gated(
    question: str,
    answer: str,
    inspector: Inspector | ScoreFn,
    threshold: float,
    correct: Callable[[], Correction],
    *,
    metadata: Mapping[str, Any] | None = None,
    context: Any = None,
) -> Correction:
    """One pair: the unchanged answer if it passes, else ``correct()`` with the verdict added.
    A pair the inspector cannot judge goes straight to ``correct()``, which raises its usual error. The
    inspector sees the pair's grounding ``context`` too."""
    verdict = gate(inspector, [_pair(question, answer, context)], threshold)
    score = verdict.scores[0]
    if score is None:
        return correct()
    if passes(score, verdict.threshold):
        return passed_correction(question, answer, score, threshold=verdict.threshold, metadata=metadata)
    return inspected(correct(), score, threshold=verdict.threshold)


async def acorrect_gated(
    question: str,
    answer: str,
    inspector: Inspector | ScoreFn,
    threshold: float,
    acorrect: Callable[[], Awaitable[Correction]],
    *,
    metadata: Mapping[str, Any] | None = None,
    context: Any = None,
) -> Correction:
    """Async :func:`correct_gated`."""
    verdict = await agate(inspector, [_pair(question, answer, context)], threshold)
    score = verdict.scores[0]
    if score is None:
        return await acorrect()
    if passes(score, verdict.threshold):
        return passed_correction(question, answer, score, threshold=verdict.threshold, metadata=metadata)
    return inspected(await acorrect(), score, threshold=verdict.threshold)


__all__ = [
    "DEFAULT_THRESHOLD",
    "INSPECTOR_CONFIG",
    "BatchScoreFn",
    "Gate",
    "Inspector",
    "InspectorError",
    "ScoreFn",
    "SequenceClassifier",
    "acorrect_batch_gated",
    "acorrect_gated",
    "agate",
    "as_inspector",
    "check_score",
    "check_threshold",
    "correct_batch_gated",
    "correct_gated",
    "gate",
    "inspected",
    "passed_correction",
    "passes",
    "question_answer",
    "read_inspector_config",
]
