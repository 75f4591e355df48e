"""Tool calling for AlignedLLM: the wrapped LLM's own, so agents keep calling tools through the wrapper.

``FunctionCallingLLM`` builds ``chat_with_tools`` / ``astream_chat_with_tools`` / ``predict_and_call`` on three
hooks; each is handed to the wrapped LLM, whose request format and tool-call parsing are the provider's. The
calls then go through AlignedLLM's ``chat``, where a response that calls tools passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ChatResponse
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import LLM, ToolSelection

from ._grounding import tool_calls_in


class ToolCalling(FunctionCallingLLM):
    """The tool-calling hooks of a wrapper whose ``llm`` does the tool calling."""

    llm: LLM

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[Any],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        return self._tool_llm()._prepare_chat_with_tools_compat(
            tools,
            user_msg=user_msg,
            chat_history=chat_history,
            verbose=verbose,
            allow_parallel_tool_calls=allow_parallel_tool_calls,
            tool_required=tool_required,
            **kwargs,
        )

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[Any],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        return self._tool_llm()._validate_chat_with_tools_response(
            response, tools, allow_parallel_tool_calls=allow_parallel_tool_calls, **kwargs
        )

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        return self._tool_llm().get_tool_calls_from_response(
            response, error_on_no_tool_call=error_on_no_tool_call, **kwargs
        )

    def _tool_llm(self) -> FunctionCallingLLM:
        if not isinstance(self.llm, FunctionCallingLLM):
            raise TypeError(f"{type(self.llm).__name__} is not a function-calling LLM: it cannot call tools")
        return self.llm

    def _tool_calls_in(self, message: ChatMessage) -> list[tuple[str | None, str, Any]]:
        """The tool calls a message makes, as the wrapped LLM reads them (if it calls tools at all)."""
        return tool_calls_in(message, self.llm if isinstance(self.llm, FunctionCallingLLM) else None)
