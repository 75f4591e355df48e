"""Conversation history through the LlamaIndex adapter: what each entry point hands the core as ``history``."""

from __future__ import annotations

import asyncio

from llama_index.core.base.llms.types import ChatMessage, MessageRole, TextBlock
from llama_index.core.chat_engine import SimpleChatEngine

from llamaindex_aligner import AlignedChatEngine, AlignedLLM
from tests.fixtures.llamaindex_helpers import ANSWER, QUESTION, ScriptedLLM, recording

FIRST = "Hi, I am planning a trip."


def expected(aligner, history, answer: str = ANSWER) -> str:
    fix = aligner.correct(QUESTION, answer, history=history or None)
    return fix.text if fix.text.strip() else answer


def test_chat_engine_second_turn_gets_the_first_as_history(tiny_aligner):
    engine = AlignedChatEngine(SimpleChatEngine.from_defaults(llm=ScriptedLLM()), tiny_aligner)
    with recording() as (events, _):
        first = engine.chat(FIRST)
        second = engine.chat(QUESTION)
    assert "history_turns" not in first.metadata["aligner"]["metadata"]
    earlier = [{"role": "user", "content": FIRST}, {"role": "assistant", "content": first.response}]
    assert second.response == expected(tiny_aligner, earlier)
    assert second.metadata["aligner"]["metadata"]["history_turns"] == 2
    prompts = [
        e.prompt for e in events.of("LLMCompletionStartEvent") if e.model_dict.get("class_name") == "Aligner"
    ]
    assert (
        first.response in prompts[-1] and FIRST in prompts[-1]
    )  # the reported prompt is the one with history


def test_chat_engine_streams_and_explicit_history(tiny_aligner):
    given = [
        ChatMessage(role=MessageRole.USER, content=FIRST),
        ChatMessage(role=MessageRole.ASSISTANT, content="Sure."),
    ]
    turns = [{"role": "user", "content": FIRST}, {"role": "assistant", "content": "Sure."}]
    engine = AlignedChatEngine(SimpleChatEngine.from_defaults(llm=ScriptedLLM()), tiny_aligner)
    want = expected(tiny_aligner, turns)
    assert engine.chat(QUESTION, chat_history=given).response == want  # a call's chat_history is the history
    streamed = engine.stream_chat(QUESTION, chat_history=given)
    assert (
        "".join(streamed.response_gen) == want
        and streamed.metadata["aligner"]["metadata"]["history_turns"] == 2
    )

    async def main() -> str:
        response = await engine.astream_chat(QUESTION, chat_history=given)
        return "".join([d async for d in response.async_response_gen()])

    assert asyncio.run(main()) == want


def test_aligned_llm_maps_roles_and_skips_tool_messages(tiny_aligner):
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="Be brief."),
        ChatMessage(
            role=MessageRole.USER, blocks=[TextBlock(text="Hi, I am"), TextBlock(text="planning a trip.")]
        ),
        ChatMessage(role=MessageRole.ASSISTANT, content="", additional_kwargs={"tool_calls": [{"id": "t1"}]}),
        ChatMessage(
            role=MessageRole.TOOL, content="weather: sunny", additional_kwargs={"tool_call_id": "t1"}
        ),
        ChatMessage(role=MessageRole.MODEL, content="Sure."),  # a provider's name for the assistant
        ChatMessage(role=MessageRole.USER, content=QUESTION),
    ]
    turns = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": "Hi, I am\nplanning a trip.",
        },  # text blocks joined as ChatMessage.content does
        {"role": "assistant", "content": "Sure."},
    ]
    llm = AlignedLLM(llm=ScriptedLLM(chat_model=True), aligner=tiny_aligner)
    response = llm.chat(messages)
    assert response.message.content == expected(tiny_aligner, turns)
    assert response.additional_kwargs["aligner"]["metadata"]["history_turns"] == 3
    chunks = list(llm.stream_chat(messages))
    assert "".join(c.delta for c in chunks) == response.message.content
    assert asyncio.run(llm.achat(messages)).message.content == response.message.content
    assert llm.complete(QUESTION).text == expected(tiny_aligner, None)  # a completion has no history
