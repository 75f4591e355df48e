"""The ``inspect`` and ``off`` modes: what a caller gets whose policy (or request) asks to score answers without
rewriting them, or to leave them alone.

``inspect``: the Aligner's inspector scores each answer the core would correct (one batch for all choices or
items), as the inspector gate scores them (the grounding context folded into the question), and the verdict is
reported (``inspector: {score, threshold, passed}``); the text is never rewritten (``skipped: "inspect_only"``).
``off``: the answer comes back as it is (``skipped: "disabled"``). Either is recorded as the core records an answer
passed through, so every endpoint reports it in its usual shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from aligner_core import Correction, fold_history
from aligner_core.context import Context
from aligner_core.decision import Decision, Skip, read_content
from aligner_core.errors import UnreadableContentError

from . import tracing


@dataclass(frozen=True)
class Verdict:
    """The inspector's score of one answer against the threshold (at or above it: the answer passes)."""

    score: float
    threshold: float

    @property
    def passed(self) -> bool:
        return self.score >= self.threshold

    def details(self) -> dict[str, Any]:
        """The ``inspector`` field of a response."""
        return {"score": self.score, "threshold": self.threshold, "passed": self.passed}

    def metadata(self) -> dict[str, Any]:
        """The verdict as the core's inspector gate records it in ``Correction.metadata``."""
        return {
            "inspected": True,
            "inspector_score": self.score,
            "inspector_threshold": self.threshold,
            "inspector_passed": self.passed,
        }


async def score(aligner: Any, items: Sequence[tuple[str, str, Context]]) -> list[Verdict]:
    """The verdicts on ``(question, answer, context)`` items, in order, from the Aligner's inspector (one batch, in a
    worker thread)."""
    if not items:
        return []
    inspector, threshold = aligner.inspector, aligner.threshold
    if inspector is None:  # the policy checks keep this from happening; say so plainly if it does
        raise RuntimeError("inspect mode needs the Aligner's inspector, and it has none")
    pairs = [(fold_history(q, (), context) if context else q, a) for q, a, context in items]
    with tracing.span(
        "aligner.inspect", {"aligner.pairs": len(pairs), "aligner.inspector.threshold": threshold}
    ) as s:
        scores = await inspector.ascore_batch(pairs)
        verdicts = [Verdict(value, threshold) for value in scores]
        s.set({"aligner.inspector.passed": sum(v.passed for v in verdicts)})
    return verdicts


def inspect_only(decision: Decision) -> Decision:
    """A decision to correct, turned into one to pass the answer through as inspected only."""
    return replace(decision, skip=Skip.INSPECT_ONLY)


def disabled(content: Any) -> Decision:
    """The decision of ``off`` mode: the answer as it is, whatever it holds, never read closely (content the Aligner
    cannot read passes too; its text, sent where a stream needs a string, is then empty)."""
    try:
        text = read_content(content).text
    except UnreadableContentError:
        text = ""
    return Decision(text, Skip.DISABLED)


def inspected_correction(question: str, answer: str, verdict: Verdict) -> Correction:
    """``/v1/corrections`` in ``inspect`` mode: the answer unchanged, with the verdict."""
    return Decision(answer, Skip.INSPECT_ONLY).passthrough(question, verdict.metadata())


def disabled_correction(question: str, answer: str) -> Correction:
    """``/v1/corrections`` in ``off`` mode: the answer unchanged."""
    return Decision(answer, Skip.DISABLED).passthrough(question)


__all__ = ["Verdict", "disabled", "disabled_correction", "inspect_only", "inspected_correction", "score"]
