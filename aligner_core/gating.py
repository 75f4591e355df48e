"""Gate a corrector with an inspector: score first, in one batch, correct only what fails.

"Aligners: Decoupling LLMs and Alignment" (Ngweta et al., 2024): an inspector scores each answer in [0, 1] and an
answer at or above the threshold passes unchanged, costing no generation. This module is the one place that
applies it: :func:`gate` scores, :func:`merge_verdict` puts the passed answers back in place as unchanged
``Correction`` objects (``skipped: "inspector_passed"``) and adds the verdict to the corrected ones, and the
``Aligner`` entry points go through :func:`one`, :func:`aone`, :func:`batch`, :func:`abatch` and
:func:`stream_verdict`. :func:`correct_batch_gated` gates any batch corrector (an adapter's, a test's).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .correction import Correction
from .errors import InvalidInputError
from .inspector import DEFAULT_THRESHOLD, Inspector, ScoreFn, as_inspector, check_threshold, passes
from .items import as_sequence, question_answer

#: "Use the Aligner's own inspector": an entry point's ``inspector=`` left out (``None`` turns gating off).
OWN: Any = type("_Own", (), {"__repr__": lambda self: "<the Aligner's inspector>"})()


def checked(inspector: Any, threshold: Any) -> tuple[Inspector | None, float]:
    """``(Inspector or None, threshold)``: a callable becomes an ``Inspector``; the threshold is in [0, 1]."""
    return (None if inspector is None else as_inspector(inspector)), check_threshold(threshold)


def choose(aligner: Any, inspector: Any, threshold: float | None) -> tuple[Inspector | None, float]:
    """The inspector and threshold of one call: the Aligner's own unless the call names others; checked."""
    return checked(
        aligner.inspector if inspector is OWN else inspector,
        aligner.threshold if threshold is None else threshold,
    )


def gate_metadata(aligner: Any) -> dict[str, Any]:
    """What a passed answer's ``Correction.metadata`` records of the Aligner (as a corrected one does)."""
    return {"template": aligner.template.name, "engine": aligner.engine.name}


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


def passed_correction(
    question: str,
    answer: str,
    score: float,
    *,
    threshold: float = DEFAULT_THRESHOLD,
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
    return {
        "inspected": True,
        "inspector_score": score,
        "inspector_threshold": threshold,
        "inspector_passed": passed,
    }


@dataclass(frozen=True)
class Verdict:
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


def gate(
    inspector: Inspector | ScoreFn, pairs: Sequence[Any], threshold: float = DEFAULT_THRESHOLD
) -> Verdict:
    """Score every pair the inspector can judge in one batch. Pairs it cannot (not strings, empty answer,
    malformed) get ``None``: they go on to the corrector, which raises or reports them as it always does."""
    inspector, threshold = as_inspector(inspector), check_threshold(threshold)
    texts = [_scoreable(p) for p in as_sequence(pairs)]
    judged = [i for i, t in enumerate(texts) if t is not None]
    scores: list[float | None] = [None] * len(texts)
    for i, s in zip(judged, inspector.score_batch([texts[i] for i in judged])):
        scores[i] = s
    return Verdict(scores, threshold)


async def agate(
    inspector: Inspector | ScoreFn, pairs: Sequence[Any], threshold: float = DEFAULT_THRESHOLD
) -> Verdict:
    """Async :func:`gate` (scored in a worker thread)."""
    return await asyncio.to_thread(gate, inspector, pairs, threshold)


def merge_verdict(
    pairs: Sequence[Any],
    verdict: Verdict,
    corrected: Sequence[Any],
    metadata: Mapping[str, Any] | None = None,
) -> list[Any]:
    """Results in input order: ``corrected`` (one per failing pair) with the verdict added, passed pairs as unchanged
    corrections carrying ``metadata``."""
    failing = verdict.failing
    if len(corrected) != len(failing):
        raise RuntimeError(f"the corrector returned {len(corrected)} results for {len(failing)} pairs")
    results: list[Any] = [None] * len(pairs)
    for i, out in zip(failing, corrected):
        score = verdict.scores[i]
        results[i] = (
            inspected(out, score, threshold=verdict.threshold)
            if (score is not None and isinstance(out, Correction))
            else out
        )
    for i in verdict.passed:
        q, a = question_answer(pairs[i], i)
        results[i] = passed_correction(
            q, a, verdict.scores[i], threshold=verdict.threshold, metadata=metadata
        )  # type: ignore[arg-type]
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


# -- the Aligner's entry points -----------------------------------------------------------------------


def one(
    aligner: Any,
    inspector: Any,
    threshold: float | None,
    question: Any,
    answer: Any,
    context: Any,
    correct: Callable[[], Correction],
) -> Correction:
    """``Aligner.correct`` under its gate: ``correct()`` alone when there is no inspector."""
    gate_with, level = choose(aligner, inspector, threshold)
    if gate_with is None:
        return correct()
    return correct_gated(
        question, answer, gate_with, level, correct, metadata=gate_metadata(aligner), context=context
    )


async def aone(
    aligner: Any,
    inspector: Any,
    threshold: float | None,
    question: Any,
    answer: Any,
    context: Any,
    acorrect: Callable[[], Awaitable[Correction]],
) -> Correction:
    """Async :func:`one`."""
    gate_with, level = choose(aligner, inspector, threshold)
    if gate_with is None:
        return await acorrect()
    return await acorrect_gated(
        question, answer, gate_with, level, acorrect, metadata=gate_metadata(aligner), context=context
    )


#: ``correct_subset(pairs, max_new_tokens, passed)``: corrects the failing pairs (``passed`` of the batch already
#: passed, for progress); without an inspector it gets every pair and ``passed == 0``.
SubsetCorrector = Callable[[Sequence[Any], Any, int], list[Any]]


def batch(
    aligner: Any,
    inspector: Any,
    threshold: float | None,
    pairs: Sequence[Any],
    max_new_tokens: Any,
    correct_subset: SubsetCorrector,
) -> list[Any]:
    """``Aligner.correct_batch`` under its gate: all pairs scored in one batch, the failing ones corrected in one
    call (their per-pair ``max_new_tokens`` follow them), the results put back in input order."""
    gate_with, level = choose(aligner, inspector, threshold)
    if gate_with is None:
        return correct_subset(pairs, max_new_tokens, 0)
    verdict = gate(gate_with, pairs, level)
    failing = [pairs[i] for i in verdict.failing]
    limits = subset_limits(max_new_tokens, verdict.failing, len(pairs))
    corrected = correct_subset(failing, limits, len(verdict.passed)) if failing else []
    return merge_verdict(pairs, verdict, corrected, gate_metadata(aligner))


async def abatch(
    aligner: Any,
    inspector: Any,
    threshold: float | None,
    pairs: Sequence[Any],
    max_new_tokens: Any,
    correct_subset: Callable[[Sequence[Any], Any], Awaitable[list[Any]]],
) -> list[Any]:
    """Async :func:`batch` (scored in a worker thread)."""
    gate_with, level = choose(aligner, inspector, threshold)
    if gate_with is None:
        return await correct_subset(pairs, max_new_tokens)
    verdict = await agate(gate_with, pairs, level)
    failing = [pairs[i] for i in verdict.failing]
    limits = subset_limits(max_new_tokens, verdict.failing, len(pairs))
    corrected = await correct_subset(failing, limits) if failing else []
    return merge_verdict(pairs, verdict, corrected, gate_metadata(aligner))


def stream_verdict(gate_with: Inspector | None, level: float, scored: Any) -> tuple[float, float] | None:
    """A stream's verdict: ``(score, threshold)``, or None without an inspector or when it could not judge."""
    if gate_with is None:
        return None
    score = gate(gate_with, [scored], level).scores[0]
    return None if score is None else (score, level)


async def astream_verdict(
    gate_with: Inspector | None, level: float, scored: Any
) -> tuple[float, float] | None:
    """Async :func:`stream_verdict` (scored in a worker thread)."""
    if gate_with is None:
        return None
    score = (await agate(gate_with, [scored], level)).scores[0]
    return None if score is None else (score, level)


def scored(prepared: Any) -> Any:
    """What the inspector scores for a prepared pair: the pair, with its grounding context when it has one."""
    if not prepared.context:
        return (prepared.question, prepared.answer)
    return {
        "question": prepared.question,
        "answer": prepared.answer,
        "context": [c.to_dict() for c in prepared.context],
    }


def subset_limits(limits: Any, indices: Sequence[int], n: int) -> Any:
    """Per-pair ``max_new_tokens`` of the pairs at ``indices`` of ``n`` (one int or None applies to all)."""
    if limits is None or isinstance(limits, (int, str, bytes)) or not isinstance(limits, Sequence):
        return limits
    if len(limits) != n:
        raise InvalidInputError(f"max_new_tokens has {len(limits)} entries for {n} pairs")
    return [limits[i] for i in indices]


__all__ = [
    "OWN",
    "Verdict",
    "abatch",
    "acorrect_batch_gated",
    "acorrect_gated",
    "agate",
    "aone",
    "astream_verdict",
    "batch",
    "checked",
    "choose",
    "correct_batch_gated",
    "correct_gated",
    "gate",
    "gate_metadata",
    "inspected",
    "merge_verdict",
    "one",
    "passed_correction",
    "scored",
    "stream_verdict",
    "subset_limits",
]
