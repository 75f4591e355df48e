"""The result type every entry point returns."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length"]


def similarity(original: str, corrected: str) -> float:
    """Similarity of two texts in [0, 1] (difflib ratio); 1.0 means unchanged."""
    if original == corrected:
        return 1.0
    return difflib.SequenceMatcher(None, original, corrected, autojunk=False).ratio()


@dataclass(frozen=True)
class Correction:
    """One corrected answer, with what a caller needs to log, trace or gate on it.

    ``changed`` compares whitespace-stripped texts, so a correction that only trims
    trailing spaces does not count as a change.
    """

    question: str
    original: str
    text: str
    changed: bool
    similarity: float
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    latency_s: float
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def build(
        cls,
        *,
        question: str,
        original: str,
        text: str,
        prompt_tokens: int,
        completion_tokens: int,
        finish_reason: FinishReason,
        latency_s: float,
        metadata: Mapping[str, Any] | None = None,
    ) -> Correction:
        """Derive ``changed`` and ``similarity`` from the two texts."""
        return cls(
            question=question,
            original=original,
            text=text,
            changed=text.strip() != original.strip(),
            similarity=similarity(original.strip(), text.strip()),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish_reason,
            latency_s=latency_s,
            metadata=dict(metadata or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {"question": self.question, "original": self.original, "text": self.text, **self.stats()}

    def stats(self) -> dict[str, Any]:
        """The JSON-ready fields besides the three texts (what output records store beside them)."""
        return {
            "changed": self.changed,
            "similarity": round(self.similarity, 6),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "latency_s": round(self.latency_s, 6),
            "metadata": dict(self.metadata),
        }
