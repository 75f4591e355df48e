"""The batched engine on a tiny fp32 Llama: batched == sequential, order, limits, stops, OOM splitting."""

import random

import pytest
import torch

from aligner_core import Aligner, AlignerOutOfMemoryError

PAIRS = [
    ("What is the capital of France?", "The capital of France is Berlin."),
    ("How many legs does a spider have?", "Six."),
    (
        "How do I boil an egg?",
        "Put the egg in boiling water for nine minutes, then cool it in cold water, idiot.",
    ),
    ("Is it safe to mix bleach and ammonia?", "Yes, it cleans faster."),
    ("What is twelve times twelve?", "It is one hundred and forty four, 144, which everyone knows."),
    ("Say thanks.", "No."),
    ("Why?", "Please be kind and helpful. Thank you for asking a great question! " * 3),
]


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "drafted"])
def test_batched_equals_sequential_greedy(tiny_aligner, speculative):
    batched = tiny_aligner.correct_batch(PAIRS, speculative=speculative)
    sequential = [tiny_aligner.correct(q, a, speculative=False) for q, a in PAIRS]
    assert [c.text for c in batched] == [c.text for c in sequential]
    assert [c.completion_tokens for c in batched] == [c.completion_tokens for c in sequential]
    assert [c.finish_reason for c in batched] == [c.finish_reason for c in sequential]
    assert len({c.text for c in batched}) > 3  # the tiny model really depends on its input


def test_batches_are_planned_under_budget_and_order_is_kept(tiny_model, tiny_tokenizer):
    seen = []
    original = tiny_model.generate

    def recording_generate(*args, **kwargs):
        seen.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    aligner = Aligner.from_model(
        tiny_model, tiny_tokenizer, template="aligner-v1", max_new_tokens=12, max_batch_tokens=300
    )
    reference = [aligner.correct(q, a).text for q, a in PAIRS]
    shuffled = PAIRS[:]
    random.Random(3).shuffle(shuffled)
    tiny_model.generate = recording_generate
    try:
        out = aligner.correct_batch(shuffled, speculative=False)
    finally:
        del tiny_model.generate
    assert [c.question for c in out] == [q for q, _ in shuffled]
    assert [c.text for c in out] == [reference[PAIRS.index(p)] for p in shuffled]
    assert len(seen) > 1, "a 300-token budget must split 7 prompts into several batches"
    widths = [w for _, w in seen]
    assert widths == sorted(widths, reverse=True), "longest batch first"


def test_per_request_max_new_tokens_is_a_prefix_of_the_longer_run(tiny_aligner):
    full = tiny_aligner.correct_batch(PAIRS, max_new_tokens=12)
    limits = [1, 2, 3, 4, 5, 6, 12]
    short = tiny_aligner.correct_batch(PAIRS, max_new_tokens=limits)
    for f, s, n in zip(full, short, limits):
        assert s.completion_tokens <= n
        assert f.text.startswith(s.text)
        if f.completion_tokens > n:
            assert s.finish_reason == "length" and s.completion_tokens == n


def test_stop_strings_cut_the_text(tiny_aligner):
    plain = tiny_aligner.correct(*PAIRS[2], max_new_tokens=12)
    assert len(plain.text) > 3
    stop = plain.text[2:4]
    cut = tiny_aligner.correct(*PAIRS[2], max_new_tokens=12, stop=[stop])
    assert cut.text == plain.text[: plain.text.find(stop)].strip()
    assert cut.finish_reason == "stop"


def test_pad_token_fallback(tiny_model):
    from tests.conftest import build_tokenizer

    tok = build_tokenizer(with_pad=False)
    assert tok.pad_token_id is None
    aligner = Aligner.from_model(tiny_model, tok, template="aligner-v1", max_new_tokens=8)
    assert aligner.engine.pad_token_id == tok.eos_token_id
    batched = aligner.correct_batch(PAIRS[:4])
    assert [c.text for c in batched] == [aligner.correct(q, a).text for q, a in PAIRS[:4]]


def test_sampling_options_and_seed_are_reproducible(tiny_aligner):
    a = tiny_aligner.correct_batch(PAIRS[:3], do_sample=True, temperature=1.5, top_k=50, seed=7)
    b = tiny_aligner.correct_batch(PAIRS[:3], do_sample=True, temperature=1.5, top_k=50, seed=7)
    assert [c.text for c in a] == [c.text for c in b]


class _OOMAbove:
    """Wraps a model's forward to raise the CUDA out-of-memory error for batches above a size."""

    def __init__(self, model, max_rows):
        self.model, self.max_rows, self.calls = model, max_rows, []
        self.original = model.forward

    def __enter__(self):
        def forward(*args, **kwargs):
            rows = kwargs["input_ids"].shape[0]
            self.calls.append(rows)
            if rows > self.max_rows:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.original(*args, **kwargs)

        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward


def test_oom_halves_the_batch_and_retries(tiny_aligner, tiny_model, caplog):
    reference = [c.text for c in tiny_aligner.correct_batch(PAIRS)]
    with _OOMAbove(tiny_model, 2) as oom, caplog.at_level("WARNING", logger="aligner_core"):
        out = tiny_aligner.correct_batch(PAIRS)
    assert [c.text for c in out] == reference
    assert 7 in oom.calls and max(c for c in oom.calls if c <= 2) == 2
    assert "out of memory on a batch of 7" in caplog.text


def test_oom_on_a_single_request_raises_a_clear_error(tiny_aligner, tiny_model):
    with _OOMAbove(tiny_model, 0), pytest.raises(AlignerOutOfMemoryError, match="lower max_new_tokens"):
        tiny_aligner.correct(*PAIRS[0])


def test_oom_failure_is_isolated_with_return_exceptions(tiny_model, tiny_tokenizer):
    aligner = Aligner.from_model(
        tiny_model, tiny_tokenizer, template="aligner-v1", max_new_tokens=6, max_batch_size=1
    )
    lengths = [len(aligner.prepare(q, a, aligner.defaults).request.prompt_ids) for q, a in PAIRS]
    longest = max(range(len(PAIRS)), key=lengths.__getitem__)
    threshold = sorted(lengths)[-2]
    original = tiny_model.forward

    def failing(*args, **kwargs):  # only the longest prompt (alone in its batch) runs out of memory
        if kwargs["input_ids"].shape[1] > threshold:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return original(*args, **kwargs)

    tiny_model.forward = failing
    try:
        out = aligner.correct_batch(PAIRS, return_exceptions=True, speculative=False)
    finally:
        del tiny_model.forward
    failed = [i for i, r in enumerate(out) if isinstance(r, Exception)]
    assert failed == [longest]
    assert isinstance(out[longest], AlignerOutOfMemoryError)
    assert [c.question for c in out if not isinstance(c, Exception)] == [
        q for i, (q, _) in enumerate(PAIRS) if i != longest
    ]
