"""What a user sees when an aligned component runs in a compiled LangGraph graph, in every stream mode.

The upstream's answer carries a marker (``RAWTOKEN``) that the tiny corrector never writes: it must not appear in
any item of ``stream_mode`` "messages", "updates", "values", "custom" or "debug", nor in a stream or end event of
``astream_events``; the corrected text streams once; agents get one correction per user turn (their tool-call
steps pass through), and the correction sees the tool result the final answer relies on.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from aligner_core import Aligner, UnsafeStreamError
from langchain_aligner import AlignedChatModel, AlignerRunnable, with_aligner
from tests.fixtures.langchain_helpers import AlignerRuns, ToolBindingFakeChatModel, record_prompts

MARKER = "RAWTOKEN"
RAW = f"{MARKER} It is sunny and 21C in Paris, {MARKER}."
QUESTION = "What is the weather in Paris?"
MODES = ["messages", "updates", "values", "custom", "debug"]
CALL = {"name": "get_weather", "args": {"city": "Paris"}, "id": "call-1", "type": "tool_call"}


@pytest.fixture(scope="module")
def aligner(tiny_model, tiny_tokenizer):
    a = Aligner.from_model(tiny_model, tiny_tokenizer, template="aligner-v1", name="tiny", max_new_tokens=8)
    yield a
    a.close()


@tool
def get_weather(city: str) -> str:
    """Get the weather in a city."""
    return "sunny, 21C"


def agent_upstream() -> ToolBindingFakeChatModel:
    """Calls the tool first, then answers: a real tool-calling turn (LangChain's fake chat model with bind_tools)."""
    return ToolBindingFakeChatModel(messages=iter([AIMessage("", tool_calls=[CALL]), AIMessage(RAW)]))


def leaks(items: list[Any]) -> list[str]:
    """Every stream item whose representation holds the uncorrected answer's marker."""
    return [repr(item)[:200] for item in items if MARKER in repr(item)]


def streamed_text(items: list[tuple[str, Any]], node: str) -> tuple[str, list[Any]]:
    """The text the "messages" mode streamed for ``node``'s AI messages, and the whole (non-chunk) AI messages it
    emitted besides the chunks."""
    text, wholes = "", []
    for mode, item in items:
        if mode != "messages" or item[1].get("langgraph_node") != node:
            continue
        message = item[0]
        if isinstance(message, AIMessageChunk):
            text += message.text
        elif isinstance(message, AIMessage):
            wholes.append(message)
    return text, wholes


def final_ai(items: list[tuple[str, Any]]) -> AIMessage:
    values = [item for mode, item in items if mode == "values"]
    return values[-1]["messages"][-1]


def custom_status(state: MessagesState) -> dict:
    get_stream_writer()({"status": "answering"})  # what a UI shows in "custom" mode
    return {}


def chat_graph(node: Any) -> Any:
    return (
        StateGraph(MessagesState)
        .add_node("status", custom_status)
        .add_node("respond", node)
        .add_edge(START, "status")
        .add_edge("status", "respond")
        .add_edge("respond", END)
        .compile()
    )


@pytest.mark.parametrize("modes", [[m] for m in MODES] + [MODES], ids=[*MODES, "all"])
def test_a_node_calling_aligned_chat_model_streams_only_the_correction(aligner, modes):
    from langchain_core.language_models import GenericFakeChatModel

    chat = AlignedChatModel(llm=GenericFakeChatModel(messages=iter([AIMessage(RAW)])), aligner=aligner)
    graph = chat_graph(lambda state: {"messages": [chat.invoke(state["messages"])]})
    items = list(graph.stream({"messages": [("human", QUESTION)]}, stream_mode=modes))  # (mode, item) pairs
    assert items and leaks(items) == []
    expected = aligner.correct(QUESTION, RAW).text
    if "messages" in modes:
        text, wholes = streamed_text(items, "respond")
        assert text == expected and wholes == []  # the corrected text once: chunks, no repeated whole message
    if "values" in modes:
        assert final_ai(items).content == expected
    if "custom" in modes:
        assert ("custom", {"status": "answering"}) in items


def test_a_node_calling_with_aligner_streams_only_the_correction(aligner):
    from langchain_core.language_models import GenericFakeChatModel

    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    chain = with_aligner(prompt | GenericFakeChatModel(messages=iter([AIMessage(RAW)])), aligner=aligner)
    graph = chat_graph(
        lambda state: {"messages": [chain.invoke({"question": state["messages"][-1].content})]}
    )
    items = list(graph.stream({"messages": [("human", QUESTION)]}, stream_mode=MODES))
    assert leaks(items) == []
    text, wholes = streamed_text(items, "respond")
    assert text == final_ai(items).content == aligner.correct(QUESTION, RAW).text and wholes == []


def agents(aligner: Aligner) -> dict[str, Any]:
    """The three agent shapes of the issue, each over an AlignedChatModel whose upstream calls a real tool."""
    from langchain.agents import create_agent
    from langgraph.prebuilt import create_react_agent

    def hand_written() -> Any:
        model = AlignedChatModel(llm=agent_upstream(), aligner=aligner).bind_tools([get_weather])
        graph = StateGraph(MessagesState)
        graph.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
        graph.add_node("tools", ToolNode([get_weather]))
        graph.add_edge(START, "agent").add_conditional_edges("agent", tools_condition).add_edge(
            "tools", "agent"
        )
        return graph.compile()

    return {
        "create_agent": lambda: create_agent(
            AlignedChatModel(llm=agent_upstream(), aligner=aligner), [get_weather]
        ),
        "prebuilt": lambda: create_react_agent(
            AlignedChatModel(llm=agent_upstream(), aligner=aligner), [get_weather]
        ),
        "tool-loop": hand_written,
    }


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # create_react_agent is deprecated for create_agent
@pytest.mark.filterwarnings("ignore:.*create_react_agent.*")
@pytest.mark.parametrize("kind", ["create_agent", "prebuilt", "tool-loop"])
def test_agents_correct_the_final_answer_once_with_the_tool_result_in_the_prompt(aligner, kind):
    graph = agents(aligner)[kind]()
    runs = AlignerRuns()
    with record_prompts(aligner) as prompts:
        items = list(
            graph.stream({"messages": [("human", QUESTION)]}, config={"callbacks": [runs]}, stream_mode=MODES)
        )
    assert leaks(items) == []
    messages = [item for mode, item in items if mode == "values"][-1]["messages"]
    step, result, final = messages[1], messages[2], messages[3]
    assert (
        step.tool_calls[0]["name"] == "get_weather"
        and step.response_metadata["aligner"]["skipped"] == "tool_calls"
    )
    assert result.content == "sunny, 21C"
    context = [
        {"type": "tool_call", "name": "get_weather", "content": '{"city": "Paris"}'},
        {"type": "tool_result", "name": "get_weather", "content": "sunny, 21C"},
    ]
    assert final.content == aligner.correct(QUESTION, RAW, context=context).text
    assert final.response_metadata["aligner"]["metadata"]["context_items"] == 2
    assert (
        runs.count == 1 and len(prompts) == 1
    )  # one correction for the user's turn; the tool step was not one
    assert "Tool result (get_weather): sunny, 21C" in prompts[0] and prompts[0].count(MARKER) == 2
    node = "model" if kind == "create_agent" else "agent"
    text, wholes = streamed_text(items, node)
    assert text == final.content and wholes == []


def test_agent_astream_events_carry_no_uncorrected_text(aligner):
    graph = agents(aligner)["create_agent"]()

    async def collect() -> list[dict[str, Any]]:
        return [e async for e in graph.astream_events({"messages": [("human", QUESTION)]}, version="v2")]

    events = asyncio.run(collect())
    outputs = [e for e in events if e["event"].endswith(("_stream", "_end"))]
    assert outputs and leaks([e["data"] for e in outputs]) == []
    tokens = "".join(e["data"]["chunk"].text for e in events if e["event"] == "on_chat_model_stream")
    assert tokens == events[-1]["data"]["output"]["messages"][-1].content  # the corrected text, once


def test_a_bare_stage_after_a_model_in_a_node_refuses_under_messages_mode(aligner):
    """``prompt | llm | AlignerRunnable()`` inside a node cannot hide the model's tokens: it fails loudly."""
    from langchain_core.language_models import GenericFakeChatModel

    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    chain = (
        prompt
        | GenericFakeChatModel(messages=iter([AIMessage(RAW)] * 3))
        | AlignerRunnable(aligner=aligner, question=QUESTION)
    )
    graph = chat_graph(lambda state: {"messages": [chain.invoke({"question": QUESTION})]})
    with pytest.raises(UnsafeStreamError, match="AlignedChatModel"):
        list(graph.stream({"messages": [("human", QUESTION)]}, stream_mode="messages"))
    assert final_ai(list(graph.stream({"messages": [("human", QUESTION)]}, stream_mode=["values"]))).content
