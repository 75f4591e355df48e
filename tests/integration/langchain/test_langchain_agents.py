"""Agents and structured output with a real upstream: SmolLM2 on the vLLM server makes real tool calls (hermes
parser) and real guided-JSON answers; the Aligner (on the same server) corrects only the answer the user reads."""

from __future__ import annotations

import json
from typing import Any

import pytest

from aligner_core import Aligner

pytestmark = [pytest.mark.integration, pytest.mark.vllm_server]
pytest.importorskip("langchain_openai")

QUESTION = "What is the weather in Paris?"
#: SmolLM2's chat template does not render tools: the system prompt shows it the call format (hermes style).
SYSTEM = (
    'You can call tools. Available tools: [{"name": "get_weather", "description": "Get the weather in a city"}]. '
    'To call a tool, answer with <tool_call>{"name": "get_weather", "arguments": {"city": "London"}}</tool_call>'
)


@pytest.fixture(scope="module")
def served(vllm_server):
    aligner = Aligner.from_server(vllm_server.url, max_new_tokens=24)
    yield aligner
    aligner.close()


@pytest.fixture(scope="module")
def upstream(vllm_server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=vllm_server.url, model=vllm_server.model, api_key="none", temperature=0, max_tokens=48
    )


def get_weather_tool() -> Any:
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Get the weather in a city."""
        return "sunny, 21C"

    return get_weather


def tool_first(request: Any, handler: Any) -> Any:
    """Call the tool on the first step and answer after its result (a 135M model needs the nudge)."""
    answered = any(m.type == "tool" for m in request.messages)
    return handler(request.override(tool_choice="none" if answered else "required"))


def test_create_agent_corrects_only_the_final_answer_with_the_tool_result(served, upstream):
    from langchain.agents import create_agent
    from langchain.agents.middleware import wrap_model_call

    from langchain_aligner import AlignedChatModel
    from tests.fixtures.langchain_helpers import AlignerRuns, record_prompts

    agent = create_agent(
        AlignedChatModel(llm=upstream, aligner=served),
        [get_weather_tool()],
        system_prompt=SYSTEM,
        middleware=[wrap_model_call(tool_first)],
    )
    runs = AlignerRuns()
    with record_prompts(served) as prompts:
        items = list(
            agent.stream(
                {"messages": [("human", QUESTION)]},
                config={"callbacks": [runs]},
                stream_mode=["messages", "updates", "values", "custom", "debug"],
            )
        )
    messages = [item for mode, item in items if mode == "values"][-1]["messages"]
    step, result, final = messages[1], messages[2], messages[3]
    assert step.tool_calls[0]["name"] == "get_weather" and step.tool_calls[0]["args"] == {"city": "Paris"}
    assert step.response_metadata["aligner"]["skipped"] == "tool_calls"  # a real tool call, passed through
    assert result.content == "sunny, 21C"
    assert final.content and final.response_metadata["aligner"]["metadata"]["context_items"] == 2
    assert runs.count == 1 and len(prompts) == 1  # one correction for the user's turn
    assert "sunny, 21C" in prompts[0] and "Tool call (get_weather)" in prompts[0]
    # the upstream's own final answer (greedy: the same again) never reached any stream unless it was kept as is
    raw = (
        upstream.bind_tools([get_weather_tool()], tool_choice="none")
        .invoke([("system", SYSTEM), *messages[:3]])
        .content
    )
    if raw.strip() != final.content.strip():
        assert raw not in repr(items)
    streamed = "".join(
        item[0].text
        for mode, item in items
        if mode == "messages"
        and item[0].type == "AIMessageChunk"
        and item[1].get("langgraph_node") == "model"
    )
    assert streamed == final.content


def test_structured_output_from_the_real_model_passes_through(served, upstream):
    from pydantic import BaseModel

    from langchain_aligner import AlignedChatModel

    class Weather(BaseModel):
        city: str
        temperature_c: int

    chat = AlignedChatModel(llm=upstream, aligner=served)
    out = chat.with_structured_output(Weather, method="json_schema", include_raw=True).invoke(
        "Paris is 21C today. Give the city and the temperature."
    )
    assert isinstance(out["parsed"], Weather) and out["parsed"].city == "Paris"
    assert out["raw"].response_metadata["aligner"]["skipped"] == "structured_output"
    assert Weather.model_validate(json.loads(out["raw"].content)) == out["parsed"]
    opted = AlignedChatModel(llm=upstream, aligner=served, correct_structured=True)
    fixed = opted.with_structured_output(Weather, method="json_schema", include_raw=True).invoke(
        "Paris is 21C today. Give the city and the temperature."
    )
    meta = fixed["raw"].response_metadata["aligner"]
    assert isinstance(fixed["parsed"], Weather)  # whatever the Aligner wrote, the result validates
    assert meta.get("skipped") in (None, "structured_output_invalid")
    assert Weather.model_validate_json(fixed["raw"].content) == fixed["parsed"]
