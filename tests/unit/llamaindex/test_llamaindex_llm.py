"""AlignedLLM on the tiny Aligner over a scripted upstream: corrected answers, safe streams, tools, agents, events."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.agent.workflow import FunctionAgent  # noqa: E402
from llama_index.core.base.llms.types import ChatMessage, ToolCallBlock  # noqa: E402
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler  # noqa: E402
from llama_index.core.llms.mock import MockFunctionCallingLLM  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402

from aligner_core import ContextOverflowError  # noqa: E402
from llamaindex_aligner import AlignedLLM  # noqa: E402
from tests.fixtures.llamaindex_helpers import ANSWER, OVERLONG, QUESTION, ScriptedLLM, recording  # noqa: E402


def user(text: str = QUESTION) -> list[ChatMessage]:
    return [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content=text)]


#: What ``user()`` holds before the question: the correction's history in ``chat`` (``complete`` has none).
SYSTEM = [{"role": "system", "content": "Be brief."}]


def corrected(aligner, answer: str = ANSWER, history: list[dict[str, str]] | None = None) -> str:
    fix = aligner.correct(QUESTION, answer, history=history)
    return fix.text if fix.text.strip() else answer


def test_chat_and_complete_return_the_correction(tiny_aligner):
    up = ScriptedLLM(chat_model=True)
    llm = AlignedLLM(llm=up, aligner=tiny_aligner)
    assert llm.metadata == up.metadata  # forwarded: predict() picks chat for a chat model
    expected, in_chat = corrected(tiny_aligner), corrected(tiny_aligner, history=SYSTEM)
    response = llm.chat(user())
    info = response.additional_kwargs["aligner"]
    assert response.message.content == in_chat == info["text"] and "original" not in info  # not sent on
    assert info["metadata"]["history_turns"] == 1
    assert response.raw["usage"]["completion_tokens"] == info["completion_tokens"] > 0
    assert llm.complete(QUESTION).text == expected
    assert asyncio.run(llm.achat(user())).message.content == in_chat
    assert asyncio.run(llm.acomplete(QUESTION)).text == expected


def test_streams_yield_only_the_correction(tiny_aligner):
    up = ScriptedLLM()
    llm = AlignedLLM(llm=up, aligner=tiny_aligner)
    expected, in_chat = corrected(tiny_aligner), corrected(tiny_aligner, history=SYSTEM)
    with recording() as (events, _):
        chunks = list(llm.stream_chat(user()))
        completions = list(llm.stream_complete(QUESTION))
    assert "".join(c.delta for c in chunks) == in_chat == chunks[-1].message.content
    assert "".join(c.delta for c in completions) == expected == completions[-1].text
    assert "original" not in chunks[-1].additional_kwargs["aligner"]  # the stream never carries the original
    assert up.streamed == 0  # the upstream never streamed: none of its tokens could reach the caller
    in_progress = events.of("LLMChatInProgressEvent") + events.of("LLMCompletionInProgressEvent")
    assert in_progress and all(e.response.delta in expected + in_chat for e in in_progress)
    assert any(
        e.response.text == ANSWER for e in events.of("LLMCompletionEndEvent")
    )  # the upstream is traced

    async def astreams():
        chat = [c.delta async for c in await llm.astream_chat(user())]
        complete = [c.delta async for c in await llm.astream_complete(QUESTION)]
        return "".join(chat), "".join(complete)

    assert asyncio.run(astreams()) == (in_chat, expected)
    assert up.streamed == 0


def test_predict_and_stream_go_through_the_correction(tiny_aligner):
    from llama_index.core.prompts import PromptTemplate

    up = ScriptedLLM()
    llm = AlignedLLM(llm=up, aligner=tiny_aligner)
    prompt = PromptTemplate("{q}")
    assert llm.predict(prompt, q=QUESTION) == corrected(tiny_aligner)
    assert "".join(llm.stream(prompt, q=QUESTION)) == corrected(tiny_aligner)
    assert up.prompts[-1] == QUESTION and up.streamed == 0


def test_token_counting_sees_the_correction(tiny_aligner):
    counter = TokenCountingHandler(tokenizer=str.split)
    up = ScriptedLLM(callback_manager=CallbackManager([counter]))
    llm = AlignedLLM(llm=up, aligner=tiny_aligner)  # shares the upstream's callback manager
    response = llm.chat(user())
    info = response.additional_kwargs["aligner"]
    *upstream, aligned = counter.llm_token_counts  # CustomLLM's chat reports its inner complete too
    assert (7, 8) in [(u.prompt_token_count, u.completion_token_count) for u in upstream]
    assert (aligned.prompt_token_count, aligned.completion_token_count) == (
        info["prompt_tokens"],
        info["completion_tokens"],
    )


def test_tool_calls_pass_through_and_the_final_answer_is_corrected(tiny_aligner):
    up = MockFunctionCallingLLM(is_chat_model=True)
    llm = AlignedLLM(llm=up, aligner=tiny_aligner)
    assert llm.metadata.is_function_calling_model

    def lookup(city: str = "Canberra") -> str:
        """Look a city up."""
        return f"{city} is the capital of Australia."

    tool = FunctionTool.from_defaults(fn=lookup)
    call = llm.chat_with_tools([tool], user_msg=QUESTION)
    assert any(isinstance(b, ToolCallBlock) for b in call.message.blocks)
    assert (
        call.additional_kwargs["aligner"]["skipped"] == "tool_calls"
    )  # an action: passed through, as the core says
    assert llm.get_tool_calls_from_response(call)[0].tool_name == "lookup"

    agent = FunctionAgent(tools=[tool], llm=llm, streaming=True)

    async def run():
        handler = agent.run(user_msg=QUESTION)
        deltas = [e.delta async for e in handler.stream_events() if type(e).__name__ == "AgentStream"]
        return deltas, await handler

    deltas, result = asyncio.run(run())
    final = str(result.response.content)
    grounding = [
        {"type": "tool_call", "name": "lookup", "content": '{"city": "Canberra"}'},
        {"type": "tool_result", "name": "lookup", "content": "Canberra is the capital of Australia."},
    ]
    fix = tiny_aligner.correct(
        QUESTION, "Tool calls complete.", context=grounding
    )  # the scripted final answer
    assert final == (fix.text if fix.text.strip() else "Tool calls complete.")
    assert "".join(deltas) == final  # the agent's stream carries the correction, not the upstream's text
    assert result.tool_calls and result.tool_calls[0].tool_name == "lookup"


def test_tools_need_a_function_calling_upstream(tiny_aligner):
    llm = AlignedLLM(llm=ScriptedLLM(), aligner=tiny_aligner)
    with pytest.raises(TypeError, match="not a function-calling LLM"):
        llm.chat_with_tools([FunctionTool.from_defaults(fn=lambda: "x", name="noop")], user_msg=QUESTION)


def test_error_policy(tiny_aligner):
    up = ScriptedLLM(answer=OVERLONG)
    with pytest.raises(ContextOverflowError):
        AlignedLLM(llm=up, aligner=tiny_aligner).chat(user())
    with pytest.raises(ContextOverflowError):
        AlignedLLM(llm=up, aligner=tiny_aligner).stream_chat(user())
    kept = AlignedLLM(llm=up, aligner=tiny_aligner, on_error="passthrough")
    response = kept.chat(user())
    assert response.message.content == OVERLONG
    assert response.additional_kwargs["aligner"]["error_type"] == "ContextOverflowError"
    assert "".join(c.delta for c in kept.stream_chat(user())) == OVERLONG
    empty = AlignedLLM(llm=ScriptedLLM(answer=""), aligner=tiny_aligner).complete(QUESTION)
    assert empty.text == "" and empty.additional_kwargs["aligner"]["skipped"] == "empty_answer"
    with pytest.raises(TypeError, match="LlamaIndex LLM"):
        AlignedLLM(llm="gpt", aligner=tiny_aligner)
    with pytest.raises(TypeError, match="Aligner"):
        AlignedLLM(llm=up, aligner=object())
