import pytest

from aligner_core.engines.local.planner import batch_cost, plan_batches


def test_every_index_once_and_under_budget():
    lengths = [5, 50, 20, 21, 7, 49, 3, 30]
    reserves = [10] * len(lengths)
    batches = plan_batches(lengths, reserves, 200)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        if len(b) > 1:
            assert batch_cost([lengths[i] for i in b], [reserves[i] for i in b]) <= 200


def test_similar_lengths_share_a_batch_and_longest_comes_first():
    lengths = [10, 100, 11, 101, 12, 102]
    batches = plan_batches(lengths, [0] * 6, 310)
    assert batches[0] == [5, 3, 1]
    assert batches[1] == [4, 2, 0]


def test_budget_counts_reserved_new_tokens():
    # 4 x (10 + 40) = 200 fits; a fifth would not.
    batches = plan_batches([10] * 5, [40] * 5, 200)
    assert [len(b) for b in batches] == [4, 1]


def test_oversized_request_gets_its_own_batch():
    assert plan_batches([1000, 5, 5], [0, 0, 0], 100) == [[0], [1, 2]]


def test_max_batch_size_caps_count():
    assert [len(b) for b in plan_batches([1] * 7, [1] * 7, 10**6, max_batch_size=3)] == [3, 3, 1]


def test_empty_and_bad_arguments():
    assert plan_batches([], [], 10) == []
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive integer, got 0"):
        plan_batches([1], [1], 0)
    with pytest.raises(ValueError, match="reserves"):
        plan_batches([1, 2], [1], 10)
