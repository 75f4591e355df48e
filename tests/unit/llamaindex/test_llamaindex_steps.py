"""AlignedLLM corrects only what the user reads: real LlamaIndex chat engines (all three modes over a VectorStoreIndex
with the packaged MiniLM), query transforms, a router, a ReAct agent and a FunctionAgent, each counted: one
correction per user turn, the intermediate calls passed through, and the Aligner's prompt holding the grounding."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("sentence_transformers")

from llama_index.core import Document, VectorStoreIndex  # noqa: E402
from llama_index.core.agent.workflow import FunctionAgent, ReActAgent  # noqa: E402
from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock  # noqa: E402
from llama_index.core.indices.query.query_transform import DecomposeQueryTransform, HyDEQueryTransform  # noqa: E402
from llama_index.core.llms.mock import MockFunctionCallingLLM  # noqa: E402
from llama_index.core.query_engine import RouterQueryEngine, TransformQueryEngine  # noqa: E402
from llama_index.core.selectors import LLMSingleSelector  # noqa: E402
from llama_index.core.tools import FunctionTool, QueryEngineTool  # noqa: E402

from aligner_core import step  # noqa: E402
from llamaindex_aligner import AlignedLLM, SentenceTransformerEmbedding  # noqa: E402
from tests.fixtures.llamaindex_helpers import MARKER, PromptSpy, ScriptedLLM, recording, roomy  # noqa: E402

DOCS = ["Canberra is the capital city of Australia.", "Spiders are arachnids and have eight legs."]
UPSTREAM = f"The capital of Australia is Sydney. {MARKER}"
#: What the scripted upstream says to LlamaIndex's own intermediate prompts (condense, select, rewrite).
RULES = {
    "standalone question": "What is the capital of Australia?",
    "numbered list": '[{"choice": 1, "reason": "It is about capitals."}]',
    "Please write a passage": "Australia has a capital.",
    "Query transformation": "What is the capital of Australia?",
}


@pytest.fixture
def roomy_aligner(tiny_tokenizer):
    return roomy(tiny_tokenizer)


@pytest.fixture(scope="module")
def index():
    """A real VectorStoreIndex over the packaged all-MiniLM-L6-v2 (loaded once for the module)."""
    return VectorStoreIndex.from_documents(
        [Document(text=t) for t in DOCS], embed_model=SentenceTransformerEmbedding()
    )


def aligned(aligner, **kwargs) -> tuple[AlignedLLM, ScriptedLLM]:
    up = ScriptedLLM(answer=UPSTREAM, rules=RULES, **kwargs)
    return AlignedLLM(llm=up, aligner=aligner), up


@pytest.mark.parametrize("mode", ["condense_question", "condense_plus_context", "context"])
@pytest.mark.parametrize("chat_model", [False, True], ids=["completion", "chat"])
def test_chat_engines_correct_one_answer_per_turn(roomy_aligner, monkeypatch, index, mode, chat_model):
    spy = PromptSpy(roomy_aligner, monkeypatch)
    llm, up = aligned(roomy_aligner, chat_model=chat_model)
    engine = index.as_chat_engine(chat_mode=mode, llm=llm, similarity_top_k=1)
    for turn, message in enumerate(["I am planning a trip to Australia.", "What is its capital?"], start=1):
        calls = len(up.prompts)
        response = engine.chat(message)
        assert len(spy.prompts) == turn  # one correction per user turn, whatever the engine asked the LLM
        assert MARKER not in response.response and response.response.strip()
        assert DOCS[0] in spy.prompts[-1]  # the retrieved text the answer relies on reaches the Aligner
        assert spy.prompts[-1].count(DOCS[0]) == 1  # once, as context (not again inside a system turn)
    if mode != "context":
        assert len(up.prompts) - calls == 2  # the second turn was condensed first: that call passed through
        assert "What is the capital of Australia?" in spy.prompts[-1] or message in spy.prompts[-1]


def test_async_chat_engine_counts_one_correction_per_turn(roomy_aligner, monkeypatch, index):
    spy = PromptSpy(roomy_aligner, monkeypatch)
    llm, up = aligned(roomy_aligner)
    engine = index.as_chat_engine(chat_mode="condense_plus_context", llm=llm, similarity_top_k=1)

    async def talk():
        await engine.achat("I am planning a trip to Australia.")
        return await engine.achat("What is its capital?")

    response = asyncio.run(talk())
    assert len(spy.prompts) == 2 and len(up.prompts) == 3
    assert MARKER not in response.response
    (condensed,) = [p for p in up.prompts if "standalone question" in p]
    assert "What is its capital?" in condensed


def test_query_transforms_and_routers_pass_their_rewrites(roomy_aligner, monkeypatch, index):
    spy = PromptSpy(roomy_aligner, monkeypatch)
    llm, up = aligned(roomy_aligner)
    plain = index.as_query_engine(llm=llm, similarity_top_k=1)
    for transform in (HyDEQueryTransform(llm=llm), DecomposeQueryTransform(llm=llm)):
        before, calls = len(spy.prompts), len(up.prompts)
        response = TransformQueryEngine(plain, transform).query("What is the capital of Australia?")
        assert len(up.prompts) - calls == 2 and len(spy.prompts) - before == 1  # the rewrite passed through
        assert MARKER not in response.response
    tools = [
        QueryEngineTool.from_defaults(plain, description="Capitals of countries."),
        QueryEngineTool.from_defaults(plain, description="Legs of animals."),
    ]
    router = RouterQueryEngine(
        selector=LLMSingleSelector.from_defaults(llm=llm), query_engine_tools=tools, llm=llm
    )
    with recording() as (events, _):
        before = len(spy.prompts)
        response = router.query("What is the capital of Australia?")
    assert (
        len(spy.prompts) - before == 1 and MARKER not in response.response
    )  # the selector's JSON was not touched
    assert response.metadata["selector_result"].ind == 0
    skipped = [
        e.response.additional_kwargs["aligner"]
        for e in events.of("LLMCompletionEndEvent")
        if "aligner" in (e.response.additional_kwargs or {})
    ]
    assert [s.get("skipped") for s in skipped] == ["intermediate_step", None]
    assert skipped[0]["call_site"].startswith("llama_index.core.selectors")


def lookup(city: str) -> str:
    """Look up the capital of a country."""
    return "Canberra is the capital of Australia."


REACT_RULES = {
    "Observation: Canberra": f"Thought: I can answer now.\nAnswer: The capital of Australia is Sydney. {MARKER}",
    "": 'Thought: I need to look it up.\nAction: lookup\nAction Input: {"city": "Australia"}',
}


@pytest.mark.parametrize("streaming", [True, False])
def test_react_agent_corrects_only_the_answer(roomy_aligner, monkeypatch, streaming):
    spy = PromptSpy(roomy_aligner, monkeypatch)
    up = ScriptedLLM(rules=REACT_RULES, chat_model=True)
    agent = ReActAgent(
        tools=[FunctionTool.from_defaults(fn=lookup)],
        llm=AlignedLLM(llm=up, aligner=roomy_aligner),
        streaming=streaming,
    )

    async def run():
        handler = agent.run(user_msg="What is the capital of Australia?")
        streamed = [
            e.delta for e in [e async for e in handler.stream_events()] if type(e).__name__ == "AgentStream"
        ]
        return streamed, await handler

    streamed, result = asyncio.run(run())
    answer = str(result.response.content)
    assert len(up.prompts) == 2 and len(spy.prompts) == 1  # the action passed, the answer was corrected
    assert MARKER not in answer and answer.strip()
    assert "Tool result (lookup): Canberra is the capital of Australia." in spy.prompts[0]  # the observation
    assert (
        "Tool call (lookup)" in spy.prompts[0] and "## Tools" not in spy.prompts[0]
    )  # not the ReAct format header
    assert not any(MARKER in d for d in streamed)
    if streaming:
        assert "".join(streamed).endswith(answer) and "Action: lookup" in "".join(streamed)


def weather(messages, **kwargs) -> ChatMessage:
    """A function-calling upstream: calls get_weather, then answers from its result."""
    if any(m.role == MessageRole.TOOL for m in messages):
        return ChatMessage(role="assistant", content=f"It is sunny and 21C in Paris. {MARKER}")
    call = ToolCallBlock(tool_call_id="call-1", tool_name="get_weather", tool_kwargs={"city": "Paris"})
    return ChatMessage(role="assistant", blocks=[call])


def get_weather(city: str) -> str:
    """The weather in a city."""
    return "sunny, 21C"


@pytest.mark.parametrize("streaming", [True, False])
def test_function_agent_grounds_the_answer_on_tool_results(roomy_aligner, monkeypatch, streaming):
    spy = PromptSpy(roomy_aligner, monkeypatch)
    llm = AlignedLLM(
        llm=MockFunctionCallingLLM(response_generator=weather, is_chat_model=True), aligner=roomy_aligner
    )
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(fn=get_weather)], llm=llm, streaming=streaming)

    async def run():
        handler = agent.run(user_msg="What is the weather in Paris?")
        streamed = [
            e.delta for e in [e async for e in handler.stream_events()] if type(e).__name__ == "AgentStream"
        ]
        return streamed, await handler

    streamed, result = asyncio.run(run())
    answer = str(result.response.content)
    assert result.tool_calls[0].tool_name == "get_weather" and len(spy.prompts) == 1
    assert MARKER not in answer and not any(MARKER in d for d in streamed)
    assert "Tool result (get_weather): sunny, 21C" in spy.prompts[0]
    assert 'Tool call (get_weather): {"city": "Paris"}' in spy.prompts[0]
    if streaming:
        assert "".join(streamed) == answer


def test_the_step_marker_overrides_the_call_site(roomy_aligner, monkeypatch, index):
    spy = PromptSpy(roomy_aligner, monkeypatch)
    llm, _ = aligned(roomy_aligner)
    with step("intermediate"):  # your own call, which the adapter would correct
        passed = llm.complete("What is the capital of Australia?")
    assert passed.text == UPSTREAM and passed.additional_kwargs["aligner"]["skipped"] == "intermediate_step"
    assert spy.prompts == []
    with step("final"):  # LlamaIndex's rewrite, which the adapter would pass
        HyDEQueryTransform(llm=llm).run("What is the capital of Australia?")
    assert len(spy.prompts) == 1
    assert (
        llm.complete("What is the capital of Australia?").additional_kwargs["aligner"].get("skipped") is None
    )
