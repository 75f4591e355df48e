"""AlignedChatModel on the tiny model with langchain-core's fake chat models as the upstream,
plus langchain-tests' standard ChatModelUnitTests."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import FakeListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableBinding
from langchain_core.tools import tool
from langchain_core.tracers.run_collector import RunCollectorCallbackHandler
from langchain_tests.unit_tests import ChatModelUnitTests
from pydantic import BaseModel

from aligner_core import Aligner
from langchain_aligner import AlignedChatModel, ChatTransformers
from tests.fixtures.langchain_helpers import ANSWER, QUESTION, ToolBindingFakeChatModel, tree

TOOL_CALL = {"name": "lookup", "args": {"animal": "spider"}, "id": "call-1", "type": "tool_call"}


@pytest.fixture(scope="module")
def aligner(tiny_model, tiny_tokenizer):
    a = Aligner.from_model(tiny_model, tiny_tokenizer, template="aligner-v1", name="tiny", max_new_tokens=10)
    yield a
    a.close()


def upstream(*messages: AIMessage | str) -> GenericFakeChatModel:
    return ToolBindingFakeChatModel(messages=iter(messages))


def test_invoke_corrects_against_the_last_human_message(aligner):
    answer = AIMessage(
        ANSWER, id="up-9", usage_metadata={"input_tokens": 4, "output_tokens": 8, "total_tokens": 12}
    )
    chat = AlignedChatModel(llm=upstream(answer), aligner=aligner)
    history = [SystemMessage("Be brief."), HumanMessage("hi"), AIMessage("Hello!"), HumanMessage(QUESTION)]
    out = chat.invoke(history)
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
    ]  # the messages before the question
    assert out.content == aligner.correct(QUESTION, ANSWER, history=turns).text
    assert out.response_metadata["aligner"]["metadata"]["history_turns"] == 3
    assert out.id == "up-9" and out.usage_metadata == answer.usage_metadata
    assert out.response_metadata["model_name"] == "generic-fake-chat-model"
    assert "original" not in out.response_metadata["aligner"]  # the replaced answer does not travel to users
    kept = AlignedChatModel(llm=upstream(answer), aligner=aligner, include_original=True).invoke(history)
    assert kept.response_metadata["aligner"]["original"] == ANSWER and kept.content == out.content


def test_stream_and_async_match_invoke(aligner):
    expected = aligner.correct(QUESTION, ANSWER).text
    chat = AlignedChatModel(llm=FakeListChatModel(responses=[ANSWER]), aligner=aligner, include_original=True)
    chunks = list(chat.stream(QUESTION))
    assert len(chunks) > 2 and chunks[-1].chunk_position == "last"
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.content == expected and full.response_metadata["aligner"]["original"] == ANSWER

    async def main():
        message = await chat.ainvoke(QUESTION)
        parts = [c async for c in chat.astream(QUESTION)]
        batch = await chat.abatch([QUESTION, QUESTION])
        return message, parts, batch

    message, parts, batch = asyncio.run(main())
    assert message.content == expected == "".join(p.content for p in parts)
    assert [m.content for m in batch] == [expected, expected]


def test_streaming_flag_makes_invoke_stream_internally(aligner):
    tokens = []

    class Tokens(BaseCallbackHandler):
        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            tokens.append(token)

    chat = AlignedChatModel(
        llm=FakeListChatModel(responses=[ANSWER]), aligner=aligner, streaming=True, include_original=True
    )
    out = chat.invoke(QUESTION, config={"callbacks": [Tokens()]})
    assert out.content == aligner.correct(QUESTION, ANSWER).text == "".join(tokens)
    assert len(tokens) > 2 and out.response_metadata["aligner"]["original"] == ANSWER


def test_tool_calls_pass_through(aligner):
    only_tools = AIMessage("", tool_calls=[TOOL_CALL], id="t1")
    with_text = AIMessage(ANSWER, tool_calls=[TOOL_CALL], id="t2")
    chat = AlignedChatModel(llm=upstream(only_tools, with_text, only_tools), aligner=aligner)
    first = chat.invoke(QUESTION)
    assert first.content == "" and first.tool_calls == [TOOL_CALL]
    assert first.response_metadata["aligner"]["skipped"] == "tool_calls"
    assert first.response_metadata["aligner"]["completion_tokens"] == 0
    second = chat.invoke(QUESTION)  # text beside tool calls is an agent's step, not its final answer
    assert second.tool_calls == [TOOL_CALL] and second.content == ANSWER
    assert second.response_metadata["aligner"]["skipped"] == "tool_calls"
    streamed = None
    for chunk in chat.stream(QUESTION):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.tool_calls == [TOOL_CALL] and streamed.content == ""


def test_agent_turn_after_a_tool_result_is_corrected_with_the_tool_turn_as_context(aligner):
    chat = AlignedChatModel(llm=upstream(AIMessage(ANSWER)), aligner=aligner)
    history = [
        HumanMessage(QUESTION),
        AIMessage("", tool_calls=[TOOL_CALL]),
        ToolMessage("8", tool_call_id="call-1"),
    ]
    context = [
        {"type": "tool_call", "name": "lookup", "content": '{"animal": "spider"}'},
        {"type": "tool_result", "name": "lookup", "content": "8"},
    ]
    out = chat.invoke(history)
    assert out.content == aligner.correct(QUESTION, ANSWER, context=context).text
    assert out.response_metadata["aligner"]["metadata"]["context_items"] == 2


def test_bind_tools_delegates_to_the_wrapped_model(aligner):
    @tool
    def lookup(animal: str) -> str:
        """Look an animal up."""
        return "8 legs"

    chat = AlignedChatModel(llm=upstream(AIMessage("", tool_calls=[TOOL_CALL])), aligner=aligner)
    bound = chat.bind_tools([lookup], tool_choice="any")
    assert isinstance(bound, RunnableBinding) and isinstance(bound.bound, AlignedChatModel)
    tools = bound.bound.llm  # the wrapped model bound its own tools; the corrector is the same
    assert bound.bound.aligner is chat.aligner and isinstance(tools, RunnableBinding)
    assert tools.kwargs["tools"][0]["function"]["name"] == "lookup" and tools.kwargs["tool_choice"] == "any"
    assert bound.invoke(QUESTION).tool_calls == [TOOL_CALL]


def test_bind_tools_on_a_model_without_tools_raises(aligner):
    chat = AlignedChatModel(llm=FakeListChatModel(responses=["x"]), aligner=aligner)
    with pytest.raises(NotImplementedError):
        chat.bind_tools([])


def test_generation_settings_reach_the_corrector(aligner):
    chat = AlignedChatModel(llm=FakeListChatModel(responses=[ANSWER]), aligner=aligner, max_tokens=3)
    assert chat.invoke(QUESTION).response_metadata["aligner"]["completion_tokens"] <= 3
    ls = chat._get_ls_params(stop=["x"])
    assert (
        ls["ls_max_tokens"] == 3 and ls["ls_stop"] == ["x"] and ls["ls_model_name"] == "fake-list-chat-model"
    )


def test_passthrough_policy(aligner):
    long = "word " * 600
    chat = AlignedChatModel(llm=FakeListChatModel(responses=[long]), aligner=aligner, on_error="passthrough")
    out = chat.invoke(QUESTION)
    assert out.content == long and out.response_metadata["aligner"]["error_type"] == "ContextOverflowError"


def test_runs_nest_under_the_chat_model_run(aligner):
    collector = RunCollectorCallbackHandler()
    chat = AlignedChatModel(llm=FakeListChatModel(responses=[ANSWER]), aligner=aligner)
    chat.invoke(QUESTION, config={"callbacks": [collector]})
    (root,) = collector.traced_runs
    assert tree(root) == (
        "AlignedChatModel",
        "llm",
        [("FakeListChatModel", "llm", []), ("AlignerRunnable", "chain", [("Aligner", "llm", [])])],
    )


def test_chat_transformers_answers_with_usage(aligner, tiny_model, tiny_tokenizer):
    llm = ChatTransformers(model=tiny_model, tokenizer=tiny_tokenizer, model_name="tiny-chat", max_tokens=5)
    out = llm.invoke([SystemMessage("Be kind."), HumanMessage(QUESTION)])
    assert isinstance(out.content, str) and out.response_metadata["model_name"] == "tiny-chat"
    assert out.usage_metadata["output_tokens"] <= 5 and out.usage_metadata["input_tokens"] > 10
    assert ChatTransformers.from_aligner(aligner).model_name == "tiny"
    with pytest.raises(TypeError, match="call options"):
        llm.invoke(QUESTION, tools=[])


class _Person(BaseModel):
    name: str


def test_with_structured_output_goes_through_the_wrapped_models_tools(aligner):
    call = {"name": "_Person", "args": {"name": "Ada"}, "id": "c9", "type": "tool_call"}
    chat = AlignedChatModel(llm=upstream(AIMessage("", tool_calls=[call])), aligner=aligner)
    assert chat.with_structured_output(_Person).invoke("Who?") == _Person(name="Ada")


# -- langchain-tests' standard unit suite ---------------------------------------------------------


class TestAlignedChatModelStandard(ChatModelUnitTests):
    """Upstream: a GenericFakeChatModel that binds tools; corrector: the tiny Aligner."""

    _aligner: Aligner | None = None

    @pytest.fixture(autouse=True)
    def _tiny_aligner(self, aligner):
        type(self)._aligner = aligner

    @property
    def chat_model_class(self) -> type[AlignedChatModel]:
        return AlignedChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"llm": upstream(AIMessage(ANSWER)), "aligner": self._aligner}
