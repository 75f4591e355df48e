"""Win rates with bootstrap confidence intervals, changed share and mean similarity.

Win rate follows the Aligner paper: ``(wins - losses) / (wins + losses + ties) x 100``, from
-100 (every correction worse) to +100 (every correction better). Invalid verdicts are counted
and reported but left out of the rate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .judges import Outcome

_SCORE = {"win": 1, "tie": 0, "loss": -1}


def win_rate(wins: int, ties: int, losses: int) -> float | None:
    """``(W - L) / (W + L + T) x 100``; ``None`` when there is no valid verdict."""
    total = wins + ties + losses
    return None if total == 0 else 100.0 * (wins - losses) / total


def bootstrap_ci(
    outcomes: Sequence[Outcome], *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the win rate, resampling records with replacement.

    Invalid outcomes are dropped first. ``None`` when no valid outcome is left.
    """
    import numpy as np

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples}")
    values = np.array([_SCORE[o] for o in outcomes if o in _SCORE], dtype=np.float64)
    if values.size == 0:
        return None
    rng = np.random.default_rng(seed)
    samples = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1) * 100.0
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(low), float(high)


@dataclass(frozen=True)
class DimensionMetrics:
    """Counts and win rate of one dimension. ``consistency`` is the share of valid verdicts whose
    presentation orders agreed (LLM judges with both orders; ``None`` otherwise)."""

    dimension: str
    wins: int
    ties: int
    losses: int
    invalid: int
    win_rate: float | None
    ci_low: float | None
    ci_high: float | None
    consistency: float | None = None

    @property
    def judged(self) -> int:
        """Records with a valid verdict."""
        return self.wins + self.ties + self.losses


@dataclass(frozen=True)
class EvalSummary:
    """Everything the report shows."""

    judge: str
    records: int
    failed: int
    changed_share: float | None
    mean_similarity: float | None
    dimensions: list[DimensionMetrics] = field(default_factory=list)
    confidence: float = 0.95
    similarities: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``summary.json``); per-record similarities are left out."""
        data = asdict(self)
        data.pop("similarities")
        return data


def dimension_metrics(
    dimension: str,
    verdicts: Iterable[Mapping[str, Any]],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> DimensionMetrics:
    """Aggregate verdict dicts (``{"outcome": ..., "orders": [...]}``) of one dimension."""
    verdicts = list(verdicts)
    outcomes: list[Outcome] = [v["outcome"] for v in verdicts]
    counts = {o: outcomes.count(o) for o in ("win", "tie", "loss", "invalid")}
    ci = bootstrap_ci(outcomes, n_resamples=n_resamples, confidence=confidence, seed=seed)
    with_orders = [v for v in verdicts if v["outcome"] != "invalid" and len(v.get("orders") or ()) > 1]
    consistency = (
        sum(len(set(v["orders"])) == 1 for v in with_orders) / len(with_orders) if with_orders else None
    )
    return DimensionMetrics(
        dimension=dimension,
        wins=counts["win"],
        ties=counts["tie"],
        losses=counts["loss"],
        invalid=counts["invalid"],
        win_rate=win_rate(counts["win"], counts["tie"], counts["loss"]),
        ci_low=None if ci is None else ci[0],
        ci_high=None if ci is None else ci[1],
        consistency=consistency,
    )


def summarize(
    rows: Iterable[Mapping[str, Any]],
    *,
    judge: str = "",
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> EvalSummary:
    """Aggregate per-record verdict lines (as ``evaluate_file`` writes them) into an :class:`EvalSummary`.

    A row is evaluated when it has an ``eval`` object (``changed``, ``similarity``, ``verdicts``);
    rows with an ``eval_error`` count as failed.
    """
    records = failed = 0
    changed: list[bool] = []
    similarities: list[float] = []
    by_dimension: dict[str, list[Mapping[str, Any]]] = {}
    judges: list[str] = []
    for row in rows:
        records += 1
        info = row.get("eval")
        if not isinstance(info, Mapping):
            failed += 1
            continue
        changed.append(bool(info["changed"]))
        similarities.append(float(info["similarity"]))
        if info.get("judge") and info["judge"] not in judges:
            judges.append(info["judge"])
        for dim, verdict in info["verdicts"].items():
            by_dimension.setdefault(dim, []).append(verdict)
    dims = [
        dimension_metrics(d, vs, n_resamples=n_resamples, confidence=confidence, seed=seed)
        for d, vs in by_dimension.items()
    ]
    return EvalSummary(
        judge=judge or ", ".join(judges),
        records=records,
        failed=failed,
        changed_share=sum(changed) / len(changed) if changed else None,
        mean_similarity=sum(similarities) / len(similarities) if similarities else None,
        dimensions=dims,
        confidence=confidence,
        similarities=similarities,
    )


__all__ = ["DimensionMetrics", "EvalSummary", "bootstrap_ci", "dimension_metrics", "summarize", "win_rate"]
