"""Answer-anchored drafting: the same tokens as plain greedy decoding, in fewer forward passes."""

import random

import pytest
import torch

from aligner_core.engines.local.speculative import AnswerDrafter, drafted_greedy


def test_drafter_follows_the_reference_in_order():
    ref = [5, 6, 7, 8, 5, 6, 9, 10]
    d = AnswerDrafter(ref)
    assert d.propose([], 3) == [5, 6, 7]
    assert d.propose([1, 5, 6], 2) == [7, 8]  # longest n-gram match wins
    d.accepted([5, 6, 7, 8, 5, 6])
    assert d.propose([5, 6, 7, 8, 5, 6], 2) == [9, 10]  # the cursor prefers the later copy
    assert d.propose([42], 3) == []
    assert AnswerDrafter([]).propose([1], 3) == []


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_tokenizer):
    from aligner_core import get_template

    t = get_template("aligner-v1")
    texts = [
        ("What is the capital of France?", "The capital of France is Berlin."),
        (
            "How do I boil an egg?",
            "Put the egg in boiling water for nine minutes, then cool it in cold water.",
        ),
        ("Say thanks.", "No."),
        ("Why?", "Please be kind and helpful. Thank you for asking a great question! " * 2),
    ]
    prompts = [tiny_tokenizer(t.format(question=q, answer=a))["input_ids"] for q, a in texts]
    return tiny_model, tiny_tokenizer, prompts


def run(model, tok, prompts, refs, limits, k):
    return drafted_greedy(
        model,
        prompts,
        refs,
        limits,
        eos_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        num_draft_tokens=k,
    )


def reference_generate(model, tok, prompt, limit):
    out = model.generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=limit,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    tokens = out[0, len(prompt) :].tolist()
    if tok.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tok.eos_token_id) + 1]
    return tokens


def test_plain_loop_equals_transformers_generate(setup):
    model, tok, prompts = setup
    limits = [20, 20, 20, 20]
    plain = run(model, tok, prompts, [[]] * 4, limits, k=0)
    for row, prompt in zip(plain, prompts):
        assert row.tokens == reference_generate(model, tok, prompt, 20)
        assert row.proposed == 0


@pytest.mark.parametrize("kind", ["perfect", "perturbed", "garbage", "mixed"])
def test_drafted_equals_plain_for_every_kind_of_draft(setup, kind):
    model, tok, prompts = setup
    limits = [24, 17, 24, 9]
    plain = [r.tokens for r in run(model, tok, prompts, [[]] * 4, limits, k=0)]
    rng = random.Random(0)
    perturbed = [[t if i % 5 else rng.randrange(len(tok)) for i, t in enumerate(p)] for p in plain]
    garbage = [[rng.randrange(len(tok)) for _ in range(30)] for _ in plain]
    refs = {
        "perfect": plain,
        "perturbed": perturbed,
        "garbage": garbage,
        "mixed": [plain[0], [], perturbed[2], garbage[3]],
    }[kind]
    rows = run(model, tok, prompts, refs, limits, k=6)
    assert [r.tokens for r in rows] == plain
    if kind == "perfect":
        assert all(r.accepted > 0 for r in rows)
        assert sum(r.steps for r in rows) < sum(len(p) for p in plain) / 2  # far fewer forward passes
    if kind == "garbage":
        assert sum(r.accepted for r in rows) <= 2


def test_drafting_through_the_aligner_reports_acceptance(tiny_aligner):
    q, a = "Why?", "Please be kind and helpful. Thank you for asking a great question!"
    plain = tiny_aligner.correct(q, a, speculative=False, max_new_tokens=16)
    drafted = tiny_aligner.correct(q, a, max_new_tokens=16)
    assert drafted.text == plain.text
    assert drafted.metadata["speculative"] is True
    assert 0.0 <= drafted.metadata["acceptance_rate"] <= 1.0
    assert "speculative" not in plain.metadata
    sampled = tiny_aligner.correct(q, a, do_sample=True, seed=1, max_new_tokens=4)
    assert "speculative" not in sampled.metadata  # drafting is exact only for greedy decoding


def test_drafted_stop_strings_match_plain(tiny_aligner):
    q, a = "How do I boil an egg?", "Put the egg in boiling water for nine minutes."
    plain = tiny_aligner.correct(q, a, speculative=False, max_new_tokens=16)
    stop = plain.text[4:6]
    assert (
        tiny_aligner.correct(q, a, max_new_tokens=16, stop=[stop]).text
        == tiny_aligner.correct(q, a, max_new_tokens=16, stop=[stop], speculative=False).text
    )


def test_verify_budget_limits_the_step_width(setup):
    model, tok, prompts = setup
    limits = [12, 12, 12, 12]
    plain = [r.tokens for r in run(model, tok, prompts, [[]] * 4, limits, k=0)]
    capped = drafted_greedy(
        model,
        prompts,
        plain,
        limits,
        eos_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        num_draft_tokens=6,
        max_verify_tokens=4,
    )
    assert [r.tokens for r in capped] == plain
    assert sum(r.proposed for r in capped) == 0  # 4 rows x width 1 already fill the budget
    roomy = drafted_greedy(
        model,
        prompts,
        plain,
        limits,
        eos_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        num_draft_tokens=6,
        max_verify_tokens=12,
    )
    assert [r.tokens for r in roomy] == plain
    assert max(r.proposed for r in roomy) > 0


def test_common_prefix_and_length_groups():
    from aligner_core.engines.local.speculative import common_prefix, group_by_length

    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 3]]) == 2  # each keeps a token of its own
    assert common_prefix([[5, 1], [6, 1]]) == 0
    groups = group_by_length([100, 10, 98, 12, 50, 11], budget=4096)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert [0, 2] in groups and [4] in groups and sorted(groups[-1]) == [1, 3, 5]
    assert all(len(g) == 1 for g in group_by_length([10] * 3, budget=10))


def test_prefill_shares_the_prefix_and_merges_groups(setup):
    from aligner_core.engines.local.speculative import _cache_keyword, prefill

    model, tok, prompts = setup
    state = prefill(model, prompts, pad_token_id=tok.pad_token_id, cache_kw=_cache_keyword(model))
    assert sorted(state.order) == list(range(len(prompts)))
    assert state.order != list(range(len(prompts)))  # grouped by length, longest first
    assert state.mask.shape[0] == len(prompts)
    assert [int(state.mask[row].sum()) for row in range(len(prompts))] == [
        len(prompts[i]) for i in state.order
    ]
    singles = [reference_generate(model, tok, p, 1)[0] for p in prompts]
    assert [singles[i] for i in state.order] == state.first


def test_models_the_loop_cannot_drive_fall_back_to_generate(tiny_model, tiny_tokenizer, caplog):
    from aligner_core import Aligner

    aligner = Aligner.from_model(tiny_model, tiny_tokenizer, template="aligner-v1", max_new_tokens=8)
    reference = aligner.correct("q", "an answer", speculative=False).text
    original = tiny_model.forward

    def old_style_forward(*args, **kwargs):
        if "logits_to_keep" in kwargs:
            raise TypeError("forward() got an unexpected keyword argument 'logits_to_keep'")
        return original(*args, **kwargs)

    tiny_model.forward = old_style_forward
    try:
        with caplog.at_level("WARNING", logger="aligner_core"):
            assert aligner.correct("q", "an answer").text == reference
    finally:
        del tiny_model.forward
    assert aligner.engine.loop_supported is False
    assert "using generate()" in caplog.text
