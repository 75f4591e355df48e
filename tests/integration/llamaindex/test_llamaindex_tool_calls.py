"""A real tool-calling upstream (SmolLM2 on the session's vLLM server, hermes tool parser) behind AlignedLLM: the
turn that calls the tool passes through, and the final answer is corrected with the tool's result in the Aligner's
prompt. Needs LlamaIndex's OpenAI-compatible LLM (``llama-index-llms-openai-like``, in the dev extra)."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")
openai_like = pytest.importorskip("llama_index.llms.openai_like")

from llama_index.core.base.llms.types import ChatMessage, MessageRole  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402

from llamaindex_aligner import AlignedLLM  # noqa: E402
from tests.fixtures.llamaindex_helpers import PromptSpy  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.vllm_server]

SYSTEM = (
    "You can call tools. To call one, answer only with a tool call such as "
    '<tool_call>{"name": "get_weather", "arguments": {"city": "London"}}</tool_call>'
)


def get_weather(city: str) -> str:
    """The current weather in a city."""
    return "sunny, 21C"


def test_tool_call_passes_and_the_grounded_answer_is_corrected(vllm_server, smollm2, monkeypatch):
    spy = PromptSpy(smollm2, monkeypatch)
    upstream = openai_like.OpenAILike(
        model="smollm2",
        api_base=vllm_server.url,
        api_key="none",
        is_chat_model=True,
        is_function_calling_model=True,
        context_window=2048,
        max_tokens=48,
        temperature=0.0,
    )
    llm = AlignedLLM(llm=upstream, aligner=smollm2, generation_kwargs={"max_new_tokens": 16})
    tool = FunctionTool.from_defaults(fn=get_weather)
    history = [ChatMessage(role=MessageRole.SYSTEM, content=SYSTEM)]
    call = llm.chat_with_tools(
        [tool], user_msg="What is the weather in Paris?", chat_history=history, tool_required=True
    )
    (selection,) = llm.get_tool_calls_from_response(call)
    assert (
        selection.tool_name == "get_weather" and call.additional_kwargs["aligner"]["skipped"] == "tool_calls"
    )
    assert spy.prompts == []  # an action, not an answer: nothing generated
    messages = [
        *history,
        ChatMessage(role=MessageRole.USER, content="What is the weather in Paris?"),
        call.message,
        ChatMessage(
            role=MessageRole.TOOL,
            content=get_weather(**selection.tool_kwargs),
            additional_kwargs={"tool_call_id": selection.tool_id},
        ),
    ]
    answer = llm.chat(messages)
    info = answer.additional_kwargs["aligner"]
    # SmolLM2's chat template gets the grounding as real turns: the call as the assistant's, the result as "tool"
    assert len(spy.prompts) == 1 and "<|im_start|>tool\nsunny, 21C<|im_end|>" in spy.prompts[0]
    assert "Tool call (get_weather): " in spy.prompts[0]
    assert info["metadata"]["context_items"] == 2 and answer.message.content == info["text"]
