"""No uncorrected text on any LlamaIndex streaming surface: the upstream's answer carries a marker the tiny Aligner
never writes, and no streamed delta, running text or instrumentation stream event may carry it; the corrected text
is streamed once."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import SummaryIndex  # noqa: E402
from llama_index.core.base.llms.types import ChatMessage  # noqa: E402

from llamaindex_aligner import AlignedChatEngine, AlignedLLM, AlignedQueryEngine  # noqa: E402
from tests.fixtures.llamaindex_helpers import (  # noqa: E402
    MARKER,
    QUESTION,
    ScriptedLLM,
    delta_texts,
    recording,
    roomy,
    text_nodes,
)

UPSTREAM = f"The capital of Australia is Sydney. {MARKER}"
RULES = {"standalone question": QUESTION}


@pytest.fixture
def roomy_aligner(tiny_tokenizer):
    return roomy(tiny_tokenizer)


def clean(texts) -> bool:
    return not any(MARKER in t for t in texts)


def test_the_marker_is_never_written_by_the_aligner(tiny_aligner):
    assert MARKER not in tiny_aligner.correct(QUESTION, UPSTREAM).text  # else the tests below could not fail


@pytest.mark.parametrize("chat_model", [False, True], ids=["completion", "chat"])
def test_aligned_llm_streams(tiny_aligner, chat_model):
    llm = AlignedLLM(llm=ScriptedLLM(answer=UPSTREAM, chat_model=chat_model), aligner=tiny_aligner)
    messages = [ChatMessage(role="user", content=QUESTION)]
    with recording() as (events, _):
        chat = list(llm.stream_chat(messages))
        complete = list(llm.stream_complete(QUESTION))

        async def astreams():
            return (
                [c async for c in await llm.astream_chat(messages)],
                [c async for c in await llm.astream_complete(QUESTION)],
            )

        achat, acomplete = asyncio.run(astreams())
    for chunks in (chat, achat):
        assert (
            "".join(c.delta for c in chunks)
            == chunks[-1].message.content
            == chunks[-1].additional_kwargs["aligner"]["text"]
        )
        assert clean(c.delta for c in chunks) and clean(c.message.content for c in chunks)
    for chunks in (complete, acomplete):
        assert "".join(c.delta for c in chunks) == chunks[-1].text and clean(c.text for c in chunks)
    assert clean(delta_texts(events))


@pytest.mark.parametrize("mode", ["condense_question", "condense_plus_context", "context"])
def test_chat_engines_over_an_aligned_llm_stream_only_corrected_text(roomy_aligner, mode):
    llm = AlignedLLM(llm=ScriptedLLM(answer=UPSTREAM, rules=RULES), aligner=roomy_aligner)
    engine = SummaryIndex([n.node for n in text_nodes()[:1]]).as_chat_engine(chat_mode=mode, llm=llm)
    with recording() as (events, _):
        first = engine.stream_chat("I am planning a trip to Australia.")
        sync = list(first.response_gen)
        engine.chat_history  # noqa: B018 - waits for the engine to write the streamed answer to its memory

        async def second():
            response = await engine.astream_chat("What is its capital?")
            return [d async for d in response.async_response_gen()]

        deltas = asyncio.run(second())
    assert sync and deltas and clean(sync) and clean(deltas)
    assert clean(delta_texts(events))
    assert clean(m.content for m in engine.chat_history)  # the memory holds what was streamed: corrected text
    assert engine.chat_history[1].content == "".join(sync)  # streamed once: the deltas add up to the answer


def test_streaming_query_engine_over_an_aligned_llm(tiny_aligner):
    llm = AlignedLLM(llm=ScriptedLLM(answer=UPSTREAM), aligner=tiny_aligner)
    engine = SummaryIndex([n.node for n in text_nodes()[:1]]).as_query_engine(llm=llm, streaming=True)
    with recording() as (events, _):
        deltas = list(engine.query(QUESTION).response_gen)
    assert deltas and clean(deltas) and clean(delta_texts(events))


def test_wrapping_engines_stream_only_corrected_text(tiny_aligner):
    up = ScriptedLLM(answer=UPSTREAM)
    index = SummaryIndex([n.node for n in text_nodes()[:1]])
    with recording() as (events, _):
        query = AlignedQueryEngine(index.as_query_engine(llm=up), tiny_aligner, streaming=True).query(
            QUESTION
        )
        chat = AlignedChatEngine(index.as_chat_engine(chat_mode="context", llm=up), tiny_aligner).stream_chat(
            QUESTION
        )
        texts = list(query.response_gen) + list(chat.response_gen)
    assert texts and clean(texts) and clean(delta_texts(events)) and up.streamed == 0
