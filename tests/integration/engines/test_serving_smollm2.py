"""Drafting, streaming and concurrency on the real SmolLM2-135M-Instruct."""

import asyncio

import pytest

from aligner_core import Aligner, ChatTemplate

pytestmark = pytest.mark.integration

COPY = [
    (
        "What is photosynthesis?",
        "Photosynthesis is the proces by which green plants use sunlight to make food from "
        "carbon dioxide and water. It releases oxygen as a by-product.",
    ),
    (
        "How do vaccines work?",
        "Vaccines train the imune system to recognise a germ without causing the disease.",
    ),
]


@pytest.fixture(scope="module")
def editor(smollm2):
    """The same loaded model prompted to copy-edit: its output copies most of the answer."""
    template = ChatTemplate(
        name="copyedit",
        instruction="Copy the following text exactly, fixing only spelling mistakes.\n\nText: {answer}\n\n"
        "(Context question, do not answer it: {question})",
    ).bind(smollm2.engine.tokenizer)
    return Aligner(smollm2.engine, template, max_new_tokens=40)


def test_drafting_equals_plain_greedy_on_the_real_model(editor):
    plain = [editor.correct(q, a, speculative=False) for q, a in COPY]
    single = [editor.correct(q, a) for q, a in COPY]
    batched = editor.correct_batch(COPY)
    assert [c.text for c in single] == [c.text for c in plain]
    assert [c.text for c in batched] == [c.text for c in plain]
    rates = [c.metadata["acceptance_rate"] for c in single]
    assert max(rates) > 0.3, rates  # copy-editing accepts many drafted tokens
    assert all(c.similarity > 0.5 for c in plain)


def test_stream_equals_correct_on_the_real_model(smollm2):
    q, a = COPY[0]
    reference = smollm2.correct(q, a, max_new_tokens=24)
    stream = smollm2.stream(q, a, max_new_tokens=24)
    assert "".join(stream) == reference.text == stream.correction.text


def test_concurrent_acorrect_on_the_real_model(smollm2):
    pairs = [(f"Question {i}: what is {i} plus {i}?", f"{i} plus {i} is {2 * i + 1}.") for i in range(6)]
    expected = [c.text for c in smollm2.correct_batch(pairs, max_new_tokens=12)]

    async def main():
        return await asyncio.gather(*(smollm2.acorrect(q, a, max_new_tokens=12) for q, a in pairs))

    assert [c.text for c in asyncio.run(main())] == expected
