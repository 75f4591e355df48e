"""The staged stream (identity epochs, then Q-A-C epochs, never mixed in one step) and its schedule."""

from __future__ import annotations

import math

import pytest

from aligner_core.training.stages import build_stream, epoch_order, stage_boundaries, staged_lr_lambda


def test_epoch_order_reshuffles_each_pass_and_takes_fractions():
    order = epoch_order(10, 2, seed=0)
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
    assert order[:10] != order[10:]
    assert len(epoch_order(10, 1.5, seed=0)) == 15
    assert epoch_order(10, 2, seed=0) == order


def test_stages_follow_each_other_and_no_step_mixes_them():
    stream, stages = build_stream([("identity", 7, 2.0), ("correction", 30, 3.0)], global_batch=4, seed=1)
    assert [(s.name, s.items, s.steps) for s in stages] == [("identity", 16, 4), ("correction", 90, 23)]
    kinds = [stage for stage, _ in stream]
    assert kinds == [0] * 16 + [1] * 90  # identity padded from 14 to 16 items: whole steps only
    for start in range(0, len(stream), 4):  # every optimizer step reads one stage
        assert len({stage for stage, _ in stream[start : start + 4]}) == 1
    assert {i for stage, i in stream if stage == 0} == set(range(7))


def test_empty_identity_stage_is_skipped():
    stream, stages = build_stream([("identity", 0, 3.0), ("correction", 5, 1.0)], global_batch=2, seed=0)
    assert [s.name for s in stages] == ["correction"] and {stage for stage, _ in stream} == {1}


def test_boundaries_follow_max_steps():
    _, stages = build_stream([("identity", 8, 1.0), ("correction", 16, 1.0)], global_batch=4, seed=0)
    assert stage_boundaries(stages, 6) == [("identity", 0, 2), ("correction", 2, 4)]
    assert stage_boundaries(stages, 1) == [("identity", 0, 1), ("correction", 1, 0)]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_learning_rate_warms_up_and_decays_again_in_each_stage(kind):
    boundaries = [("identity", 0, 20), ("correction", 20, 100)]
    lr = staged_lr_lambda(boundaries, warmup_ratio=0.1, kind=kind)
    first = [lr(s) for s in range(20)]
    second = [lr(s) for s in range(20, 120)]
    assert first[0] < first[1] < first[2] == pytest.approx(1.0)  # 2 warm-up steps
    assert second[0] < second[9] < second[10] == pytest.approx(1.0)  # 10 warm-up steps, restarted
    if kind == "constant":
        assert first[-1] == second[-1] == 1.0
    else:
        assert first[-1] < 0.1 and second[-1] < 0.05
        assert second[55] == pytest.approx(
            0.5 if kind == "linear" else 0.5 * (1 + math.cos(math.pi * 45 / 90)), abs=0.02
        )
