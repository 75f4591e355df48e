"""The inspector gate in the Aligner facade: passed answers cost no generation, every entry point gates."""

from __future__ import annotations

import asyncio

import pytest

from aligner_core import Aligner
from aligner_core.errors import InspectorError
from aligner_core.inspector import Inspector

PAIRS = [(f"Question {i}?", f"Answer number {i}.") for i in range(10)]


def every_fifth_fails(question: str, answer: str) -> float:
    """80% pass: the answers whose number is a multiple of 5 score 0.1, the rest 0.9."""
    return 0.1 if int(answer.split()[-1].rstrip(".")) % 5 == 0 else 0.9


@pytest.fixture
def gated(tiny_model, tiny_tokenizer):
    aligner = Aligner.from_model(
        tiny_model,
        tiny_tokenizer,
        template="aligner-v1",
        max_new_tokens=6,
        inspector=every_fifth_fails,
        threshold=0.5,
    )
    yield aligner
    aligner.close()


def test_batch_scores_once_and_generates_only_the_failing_pairs(gated):
    calls = []

    def batched(pairs):
        calls.append(len(pairs))
        return [every_fifth_fails(q, a) for q, a in pairs]

    out = gated.correct_batch(PAIRS, inspector=Inspector(batched, batched=True), max_new_tokens=[6] * 10)
    assert calls == [10]  # one scoring call for the whole batch
    for (q, a), c in zip(PAIRS, out):
        fails = every_fifth_fails(q, a) < 0.5
        assert c.question == q and c.original == a
        assert c.metadata["inspector_passed"] is (not fails)
        assert c.metadata["inspector_score"] == every_fifth_fails(q, a)
        if fails:
            assert c.completion_tokens > 0
        else:
            assert (c.text, c.changed, c.completion_tokens, c.prompt_tokens) == (a, False, 0, 0)
    ungated = gated.correct_batch([PAIRS[0], PAIRS[5]], inspector=None)
    assert [c.text for c in ungated] == [out[0].text, out[5].text]  # same greedy corrections as the gated run
    assert "inspector_score" not in ungated[0].metadata


def test_single_async_and_streaming_calls_gate(gated):
    passed = gated.correct(*PAIRS[1])
    assert passed.text == PAIRS[1][1] and passed.completion_tokens == 0 and not passed.changed
    corrected = gated.correct(*PAIRS[0])
    assert corrected.completion_tokens > 0 and corrected.metadata["inspector_passed"] is False
    assert asyncio.run(gated.acorrect(*PAIRS[1])).completion_tokens == 0
    assert asyncio.run(gated.acorrect(*PAIRS[0])).text == corrected.text
    results = asyncio.run(gated.acorrect_batch(PAIRS[:6]))
    assert [r.completion_tokens == 0 for r in results] == [False, True, True, True, True, False]
    stream = gated.stream(*PAIRS[2])
    assert "".join(stream) == PAIRS[2][1] and stream.correction.metadata["inspector_passed"]
    stream = gated.stream(*PAIRS[5])
    assert (
        "".join(stream) == stream.correction.text and stream.correction.metadata["inspector_passed"] is False
    )

    async def astream(pair):
        s = gated.astream(*pair)
        return "".join([d async for d in s]), s.correction

    text, correction = asyncio.run(astream(PAIRS[3]))
    assert text == PAIRS[3][1] and correction.completion_tokens == 0
    text, correction = asyncio.run(astream(PAIRS[0]))
    assert text == correction.text == corrected.text and correction.metadata["inspector_score"] == 0.1


def test_per_call_threshold_and_switching_off(gated):
    assert gated.correct(*PAIRS[1], threshold=0.95).metadata["inspector_passed"] is False  # 0.9 < 0.95
    assert "inspected" not in gated.correct(*PAIRS[1], inspector=None).metadata
    assert gated.correct(*PAIRS[0], inspector=lambda q, a: 1.0).completion_tokens == 0


def test_bad_scores_and_thresholds_are_clear_errors(gated, tiny_model, tiny_tokenizer):
    with pytest.raises(InspectorError, match=r"\[0, 1\]"):
        gated.correct(*PAIRS[0], inspector=lambda q, a: 2.0)
    with pytest.raises(InspectorError, match="threshold"):
        gated.correct(*PAIRS[0], threshold=1.5)
    with pytest.raises(InspectorError, match="threshold"):
        Aligner.from_model(tiny_model, tiny_tokenizer, template="aligner-v1", threshold=-1)
    with pytest.raises(TypeError, match="callable"):
        Aligner.from_model(tiny_model, tiny_tokenizer, template="aligner-v1", inspector="not callable")
