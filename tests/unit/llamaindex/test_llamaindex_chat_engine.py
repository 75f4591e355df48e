"""AlignedChatEngine on the tiny Aligner over real LlamaIndex chat engines: answers, safe streams, corrected history."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import SummaryIndex  # noqa: E402
from llama_index.core.chat_engine import SimpleChatEngine  # noqa: E402
from llama_index.core.chat_engine.types import StreamingAgentChatResponse  # noqa: E402

from aligner_core import ContextOverflowError  # noqa: E402
from llamaindex_aligner import AlignedChatEngine, AlignedQueryEngine  # noqa: E402
from tests.fixtures.llamaindex_helpers import ANSWER, OVERLONG, QUESTION, ScriptedLLM, recording, text_nodes  # noqa: E402


def corrected(aligner, question: str = QUESTION, answer: str = ANSWER) -> str:
    fix = aligner.correct(question, answer)
    return fix.text if fix.text.strip() else answer


def test_query_engine_wrapper_points_to_the_chat_engine_class(tiny_aligner):
    chat_engine = SummaryIndex([n.node for n in text_nodes()]).as_chat_engine(llm=ScriptedLLM())
    with pytest.raises(TypeError, match="AlignedChatEngine"):
        AlignedQueryEngine(chat_engine, tiny_aligner)


def test_chat_corrects_and_the_history_keeps_the_correction(tiny_aligner):
    up = ScriptedLLM()
    engine = AlignedChatEngine(SimpleChatEngine.from_defaults(llm=up), tiny_aligner)
    response = engine.chat(QUESTION)
    info = response.metadata["aligner"]
    assert (
        response.response == corrected(tiny_aligner) == info["text"] and "original" not in info
    )  # not sent on
    assert [m.content for m in engine.chat_history] == [QUESTION, response.response]
    engine.chat("And of France?")
    assert (
        response.response in up.prompts[-1] and ANSWER not in up.prompts[-1]
    )  # the next turn sees the correction
    assert len(engine.chat_history) == 4
    engine.reset()
    assert engine.chat_history == [] and engine.chat_engine.chat_history == []


def test_stream_chat_streams_only_the_correction(tiny_aligner):
    up = ScriptedLLM()
    engine = AlignedChatEngine(SimpleChatEngine.from_defaults(llm=up), tiny_aligner)
    with recording() as (events, _):
        response = engine.stream_chat(QUESTION)
        assert isinstance(response, StreamingAgentChatResponse)
        text = "".join(response.response_gen)
    assert text == corrected(tiny_aligner) == response.response == response.metadata["aligner"]["text"]
    assert (
        up.streamed == 0
    )  # the inner engine never streamed: its raw answer reached no stream or stream event
    assert all(e.delta in text for e in events.of("StreamChatDeltaReceivedEvent"))
    assert [m.content for m in engine.chat_history] == [QUESTION, text]


def test_async_chat_over_a_context_chat_engine(tiny_aligner):
    up = ScriptedLLM()
    inner = SummaryIndex([n.node for n in text_nodes()]).as_chat_engine(chat_mode="context", llm=up)
    engine = AlignedChatEngine(inner, tiny_aligner)

    async def main():
        first = await engine.achat(QUESTION)
        streaming = await engine.astream_chat(QUESTION)
        return first, streaming, "".join([d async for d in streaming.async_response_gen()])

    first, streaming, text = asyncio.run(main())
    retrieved = [
        n.node.get_content() for n in text_nodes()
    ]  # the answer's grounding: the engine's source nodes
    alone = tiny_aligner.correct(QUESTION, ANSWER, context=retrieved)
    assert first.response == (alone.text if alone.text.strip() else ANSWER)
    earlier = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first.response}]
    second = tiny_aligner.correct(
        QUESTION, ANSWER, history=earlier, context=retrieved
    )  # the first turn is history
    assert text == (second.text if second.text.strip() else ANSWER)
    assert streaming.metadata["aligner"]["metadata"]["history_turns"] == 2
    assert streaming.metadata["aligner"]["metadata"]["context_items"] == 3
    assert [n.node.node_id for n in streaming.source_nodes] == ["n1", "n2", "n3"]
    assert up.streamed == 0 and len(engine.chat_history) == 4


def test_error_policy(tiny_aligner):
    inner = SimpleChatEngine.from_defaults(llm=ScriptedLLM(answer=OVERLONG))
    with pytest.raises(ContextOverflowError):
        AlignedChatEngine(inner, tiny_aligner).chat(QUESTION)
    kept = AlignedChatEngine(inner, tiny_aligner, on_error="passthrough")
    assert kept.chat(QUESTION).metadata["aligner"]["error_type"] == "ContextOverflowError"
    assert "".join(kept.stream_chat(QUESTION).response_gen) == OVERLONG
    with pytest.raises(TypeError, match="BaseChatEngine"):
        AlignedChatEngine(object(), tiny_aligner)
