"""The judge protocol and its verdict type, shared by the LLM judge and the reward-model judge.

A judge compares a correction with the original answer it replaced, on one or more dimensions,
and says for each whether the correction ``win``s, ``tie``s or ``loss``es (or that its verdict was
``invalid``: it could not be read). Outcomes are always from the correction's point of view.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Outcome = Literal["win", "tie", "loss", "invalid"]
OUTCOMES: tuple[Outcome, ...] = ("win", "tie", "loss", "invalid")
_SCORE = {"win": 1, "tie": 0, "loss": -1}


@dataclass(frozen=True)
class Comparison:
    """One item to judge: the question, the upstream answer and its correction."""

    question: str
    original: str
    correction: str


@dataclass(frozen=True)
class Verdict:
    """A judge's verdict on one dimension, from the correction's point of view.

    ``orders`` holds the outcome of each presentation order (LLM judges: correction shown second,
    then first), ``raw`` the judge's replies, ``scores`` the ``(original, correction)`` scores of a
    reward model.
    """

    outcome: Outcome
    orders: tuple[Outcome, ...] = ()
    raw: tuple[str, ...] = ()
    scores: tuple[float, float] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the per-record verdict lines hold these)."""
        out: dict[str, Any] = {"outcome": self.outcome}
        if self.orders:
            out["orders"] = list(self.orders)
        if self.raw:
            out["raw"] = list(self.raw)
        if self.scores is not None:
            out["scores"] = [round(s, 6) for s in self.scores]
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verdict:
        """Read back what :meth:`to_dict` wrote."""
        known = {"outcome", "orders", "raw", "scores"}
        scores = data.get("scores")
        return cls(
            outcome=data["outcome"],
            orders=tuple(data.get("orders", ())),
            raw=tuple(data.get("raw", ())),
            scores=None if scores is None else (float(scores[0]), float(scores[1])),
            extra={k: v for k, v in data.items() if k not in known},
        )


def combine_orders(outcomes: Sequence[Outcome]) -> Outcome:
    """Merge the verdicts of both presentation orders into one.

    Each order votes +1 (win), 0 (tie) or -1 (loss) and the sign of the sum decides: a win in both
    orders (or a win and a tie) is a win, a win in one order and a loss in the other is a tie (the
    judge only followed the position). Any invalid order makes the verdict invalid: one order alone
    would bring the position bias back.
    """
    if not outcomes or any(o not in _SCORE for o in outcomes):
        return "invalid"
    total = sum(_SCORE[o] for o in outcomes)
    return "win" if total > 0 else "loss" if total < 0 else "tie"


@runtime_checkable
class Judge(Protocol):
    """Anything that judges corrections against originals on named dimensions."""

    #: A name recorded in the verdicts and the report (e.g. the judge model's id).
    name: str
    #: The dimensions every verdict dict holds, in report order.
    dimensions: tuple[str, ...]

    def judge_batch(
        self, items: Sequence[Comparison], *, on_result: Callable[[int], None] | None = None
    ) -> list[dict[str, Verdict]]:
        """Judge every item; one ``{dimension: Verdict}`` per item, in input order.

        ``on_result(i)`` is called as item ``i`` is finished (for progress bars). Errors of the
        judge itself (an API that is down) raise; only unreadable verdicts become ``invalid``.
        """
        ...


__all__ = ["OUTCOMES", "Comparison", "Judge", "Outcome", "Verdict", "combine_orders"]
