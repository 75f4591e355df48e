"""Win-rate arithmetic against hand-computed cases, the bootstrap interval, and the summary of verdict lines."""

import math

import pytest

from aligner_core.evaluation import bootstrap_ci, combine_orders, dimension_metrics, summarize, win_rate


def test_win_rate_matches_hand_computed_cases():
    assert win_rate(3, 1, 1) == pytest.approx(40.0)  # (3 - 1) / 5
    assert win_rate(0, 0, 4) == pytest.approx(-100.0)
    assert win_rate(2, 6, 2) == pytest.approx(0.0)
    assert win_rate(1, 2, 0) == pytest.approx(100 / 3)
    assert win_rate(0, 0, 0) is None


def test_bootstrap_interval_brackets_the_rate_and_is_reproducible():
    outcomes = ["win"] * 6 + ["tie"] * 2 + ["loss"] * 2 + ["invalid"] * 3  # invalid dropped: rate 40
    low, high = bootstrap_ci(outcomes, n_resamples=500, seed=1)
    assert low < 40.0 < high and low >= -100 and high <= 100
    assert bootstrap_ci(outcomes, n_resamples=500, seed=1) == (low, high)
    assert bootstrap_ci(["win"] * 5) == (100.0, 100.0)  # no spread without disagreement
    assert bootstrap_ci(["invalid", "invalid"]) is None
    wider = bootstrap_ci(outcomes, n_resamples=500, seed=1, confidence=0.99)
    assert wider[0] <= low and wider[1] >= high
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(outcomes, confidence=1.5)


def test_combine_orders_cancels_position_bias():
    assert combine_orders(["win", "win"]) == "win"
    assert combine_orders(["win", "tie"]) == "win"
    assert combine_orders(["loss", "tie"]) == "loss"
    assert combine_orders(["win", "loss"]) == "tie"  # the judge only followed the position
    assert combine_orders(["tie", "tie"]) == "tie"
    assert combine_orders(["win", "invalid"]) == "invalid"
    assert combine_orders(["loss"]) == "loss"
    assert combine_orders([]) == "invalid"


def test_dimension_metrics_counts_rate_and_consistency():
    verdicts = [
        {"outcome": "win", "orders": ["win", "win"]},
        {"outcome": "win", "orders": ["win", "tie"]},
        {"outcome": "tie", "orders": ["win", "loss"]},
        {"outcome": "loss", "orders": ["loss", "loss"]},
        {"outcome": "invalid", "orders": ["win", "invalid"]},
    ]
    m = dimension_metrics("helpfulness", verdicts, n_resamples=200)
    assert (m.wins, m.ties, m.losses, m.invalid, m.judged) == (2, 1, 1, 1, 4)
    assert m.win_rate == pytest.approx(25.0)  # (2 - 1) / 4
    assert m.consistency == pytest.approx(0.5)  # 2 of the 4 valid verdicts agree across orders
    assert m.ci_low <= 25.0 <= m.ci_high
    assert dimension_metrics("reward", [{"outcome": "win", "scores": [0.1, 0.2]}]).consistency is None


def test_summarize_counts_changed_similarity_and_failures():
    rows = [
        {
            "eval": {
                "changed": True,
                "similarity": 0.5,
                "judge": "j",
                "verdicts": {"h": {"outcome": "win"}, "s": {"outcome": "tie"}},
            }
        },
        {
            "eval": {
                "changed": False,
                "similarity": 1.0,
                "judge": "j",
                "verdicts": {"h": {"outcome": "tie"}, "s": {"outcome": "tie"}},
            }
        },
        {
            "eval": {
                "changed": True,
                "similarity": 0.3,
                "judge": "j",
                "verdicts": {"h": {"outcome": "loss"}, "s": {"outcome": "win"}},
            }
        },
        {"eval_error": {"type": "ValueError", "message": "bad"}},
    ]
    s = summarize(rows, n_resamples=100)
    assert (s.records, s.failed, s.judge) == (4, 1, "j")
    assert s.changed_share == pytest.approx(2 / 3)
    assert s.mean_similarity == pytest.approx(0.6)
    assert [d.dimension for d in s.dimensions] == ["h", "s"]
    h, sd = s.dimensions
    assert (h.wins, h.ties, h.losses, h.win_rate) == (1, 1, 1, 0.0)
    assert sd.win_rate == pytest.approx(100 / 3)
    assert "similarities" not in s.to_dict() and s.to_dict()["dimensions"][0]["dimension"] == "h"
    empty = summarize([])
    assert empty.records == 0 and empty.changed_share is None and empty.dimensions == []
    assert not any(isinstance(v, float) and math.isnan(v) for v in empty.to_dict().values())
