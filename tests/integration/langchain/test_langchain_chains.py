"""Real chains: SmolLM2-135M-Instruct answers (ChatTransformers) and the Aligner on the same packaged model corrects."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.tracers.run_collector import RunCollectorCallbackHandler

from langchain_aligner import (
    EVENT,
    UNCORRECTED_TAG,
    AlignedChatModel,
    AlignerRunnable,
    ChatTransformers,
    with_aligner,
)
from tests.fixtures.langchain_helpers import EventRecorder, names, tree

pytestmark = pytest.mark.integration

TOKENS = 16
QUESTIONS = [
    "What is the capital of Australia?",
    "How many legs does a spider have?",
    "Name a primary color.",
]
PROMPT = ChatPromptTemplate.from_messages(
    [("system", "Answer in one short sentence."), ("human", "{question}")]
)


@pytest.fixture(scope="module")
def llm(smollm2):
    return ChatTransformers.from_aligner(smollm2, max_tokens=TOKENS)


@pytest.fixture(scope="module")
def stage(smollm2):
    return AlignerRunnable(aligner=smollm2, generation_kwargs={"max_new_tokens": TOKENS})


@pytest.fixture(scope="module")
def answers(llm):
    return [m.content for m in llm.batch([PROMPT.invoke({"question": q}) for q in QUESTIONS])]


def test_form1_batch_keeps_order_and_matches_the_core(smollm2, llm, stage, answers):
    chain = RunnablePassthrough.assign(answer=PROMPT | llm | StrOutputParser()) | stage
    out = chain.batch([{"question": q} for q in QUESTIONS])
    expected = smollm2.correct_batch(list(zip(QUESTIONS, answers)), max_new_tokens=TOKENS)
    assert out == [c.text for c in expected]
    assert all(isinstance(o, str) and o for o in out)


def test_form2_message_metadata_survives_and_runs_nest(smollm2, llm, answers):
    collector, recorder = RunCollectorCallbackHandler(), EventRecorder()
    chain = with_aligner(
        PROMPT | llm, aligner=smollm2, generation_kwargs={"max_new_tokens": TOKENS}, include_original=True
    )
    out = chain.invoke({"question": QUESTIONS[0]}, config={"callbacks": [collector, recorder]})
    assert isinstance(out, AIMessage) and out.content
    assert out.usage_metadata["output_tokens"] > 0 and out.usage_metadata["input_tokens"] > 20
    assert out.response_metadata["model_name"] == smollm2.name
    meta = out.response_metadata["aligner"]
    assert (
        meta["original"] == answers[0]
        and meta["model"] == smollm2.name
        and meta["metadata"]["template"] == "chat"
    )
    assert meta["changed"] == (out.content.strip() != answers[0].strip())
    (root,) = collector.traced_runs
    shape = tree(root)
    assert shape[0] == "with_aligner" and shape[2][-1] == (
        "AlignerRunnable",
        "chain",
        [("Aligner", "llm", [])],
    )
    assert {"ChatPromptTemplate", "ChatTransformers"} <= set(names(shape))
    upstream = root.child_runs[
        0
    ]  # the wrapped chain: traced, and tagged as uncorrected and kept off user streams
    assert (
        upstream.name == "RunnableSequence"
        and UNCORRECTED_TAG in upstream.tags
        and "nostream" in upstream.tags
    )
    chat_run = upstream.child_runs[-1]
    assert chat_run.run_type == "llm" and chat_run.name == "ChatTransformers"
    assert [e[0] for e in recorder.events] == [EVENT]


def test_form3_configurable_question_streams_inside_the_sequence(smollm2, llm, answers):
    chain = (
        PROMPT
        | llm
        | StrOutputParser()
        | AlignerRunnable(aligner=smollm2, generation_kwargs={"max_new_tokens": TOKENS})
    )
    config = {"configurable": {"question": QUESTIONS[1]}}
    deltas = list(chain.stream({"question": QUESTIONS[1]}, config=config))
    assert len(deltas) > 1 and all(isinstance(d, str) for d in deltas)
    assert "".join(deltas) == smollm2.correct(QUESTIONS[1], answers[1], max_new_tokens=TOKENS).text


def test_async_batch_and_stream(smollm2, llm, answers):
    chain = with_aligner(
        PROMPT | llm, aligner=smollm2, generation_kwargs={"max_new_tokens": TOKENS}, include_original=True
    )

    async def main():
        batch = await chain.abatch([{"question": q} for q in QUESTIONS[:2]])
        chunks = [c async for c in chain.astream({"question": QUESTIONS[2]})]
        return batch, chunks

    batch, chunks = asyncio.run(main())
    assert [m.response_metadata["aligner"]["original"] for m in batch] == answers[:2]
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert len(chunks) > 2 and full.response_metadata["aligner"]["original"] == answers[2]
    assert full.content == smollm2.correct(QUESTIONS[2], answers[2], max_new_tokens=TOKENS).text


def test_aligned_chat_model_in_a_chain(smollm2, llm, answers):
    chat = AlignedChatModel(llm=llm, aligner=smollm2, max_tokens=TOKENS)
    chain = PROMPT | chat | StrOutputParser()
    out = chain.batch([{"question": q} for q in QUESTIONS[:2]])
    system = [
        {"role": "system", "content": "Answer in one short sentence."}
    ]  # before the question: the history
    expected = smollm2.correct_batch(
        [(q, a, system) for q, a in zip(QUESTIONS[:2], answers[:2])], max_new_tokens=TOKENS
    )
    assert out == [c.text for c in expected]
