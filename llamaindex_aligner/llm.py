"""AlignedLLM: any LlamaIndex LLM whose final answers are corrected by an Aligner (for chat engines and agents).

The counterpart of LangChain's ``AlignedChatModel``. Streaming is safe by construction: the wrapped
LLM is always called *without* streaming (its call is traced, but it has no token stream to leak), and
only the Aligner's correction is streamed to the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aligner_core import Aligner
from aligner_core.errors import missing

try:
    from llama_index.core.base.llms.types import (
        ChatMessage,
        ChatResponse,
        ChatResponseAsyncGen,
        ChatResponseGen,
        CompletionResponse,
        CompletionResponseAsyncGen,
        CompletionResponseGen,
        LLMMetadata,
        MessageRole,
        ToolCallBlock,
    )
    from llama_index.core.bridge.pydantic import Field, PrivateAttr, SerializeAsAny
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.function_calling import FunctionCallingLLM
    from llama_index.core.llms.llm import LLM, ToolSelection
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing("llama-index-core", "llamaindex", feature="llamaindex_aligner") from exc

from ._common import OnError, history_turns
from ._correct import AnswerCorrector
from ._streams import Relay
from .llm_events import usage

COMPONENT = "llm"


class AlignedLLM(FunctionCallingLLM):
    """Wraps a LlamaIndex LLM: each final answer it writes is corrected against the last user message.

    The messages before that one are the correction's history (user, assistant and system messages;
    tool results and assistant turns that only call tools are skipped); ``complete`` has none.

    ``chat``/``complete`` and their ``stream_``/``a`` variants call the wrapped LLM (never its stream),
    then correct its answer; the ``stream_`` variants stream **only** the correction. A response that
    carries tool calls is not a final answer and passes through unchanged, so a function-calling
    agent (``FunctionAgent``) over an ``AlignedLLM`` keeps calling tools and has only its final answer
    corrected. The correction's details go to ``response.additional_kwargs[metadata_key]`` and
    ``response.raw[metadata_key]`` (the keys ``AlignedQueryEngine`` puts in ``metadata``), and
    ``response.raw["usage"]`` holds the correction's token counts. Prompt formatting is the wrapped
    LLM's: ``complete`` hands it the prompt unformatted. The metadata is the wrapped LLM's. With an
    ``inspector``, an answer scoring at or above ``threshold`` is returned unchanged (no generation).
    """

    llm: SerializeAsAny[LLM] = Field(description="The LLM whose final answers are corrected.")
    on_error: OnError = Field(
        default="raise", description="'raise' propagates Aligner failures; 'passthrough' serves the uncorrected answer."
    )
    generation_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Generation options for the Aligner (max_new_tokens, stop, ...)."
    )
    metadata_key: str = Field(default="aligner", min_length=1, description="Key under which the correction is recorded.")
    inspector: Any = Field(
        default=None, exclude=True,
        description="Scores (question, answer) in [0, 1] (1: aligned) first: an Inspector or a callable.",
    )
    threshold: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="An answer scoring at or above it is returned unchanged, with no correction generated; "
        "None: the Aligner's.",
    )

    _corrector: AnswerCorrector = PrivateAttr()

    def __init__(self, llm: LLM, aligner: Aligner, **kwargs: Any) -> None:
        if not isinstance(llm, LLM):
            raise TypeError(f"llm must be a LlamaIndex LLM, got {type(llm).__name__}")
        kwargs.setdefault("callback_manager", llm.callback_manager)
        super().__init__(llm=llm, **kwargs)
        # The aligned call itself is reported as the LLM call (its raw usage is the correction's).
        self._corrector = AnswerCorrector(
            aligner, component=COMPONENT, on_error=self.on_error, generation_kwargs=self.generation_kwargs,
            report_llm=False, inspector=self.inspector, threshold=self.threshold,
        )

    @classmethod
    def class_name(cls) -> str:
        return "AlignedLLM"

    @property
    def aligner(self) -> Aligner:
        """The Aligner that corrects the answers."""
        return self._corrector.aligner

    @property
    def metadata(self) -> LLMMetadata:
        return self.llm.metadata

    # -- chat --------------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        response = self.llm.chat(messages, **kwargs)
        answer = self._final_answer(response)
        if answer is None:
            return response
        return self._chat_response(response, self._correct(*split_messages(messages), answer))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        response = await self.llm.achat(messages, **kwargs)
        answer = self._final_answer(response)
        if answer is None:
            return response
        return self._chat_response(response, await self._acorrect(*split_messages(messages), answer))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        response = self.llm.chat(messages, **kwargs)  # not stream_chat: its tokens must not reach the caller
        answer = self._final_answer(response)
        if answer is None:
            return iter([response])
        question, history = split_messages(messages)
        info, relay = self._corrector.open(question, answer, history)

        def gen() -> ChatResponseGen:
            text = ""
            for delta in relay.deltas() if relay else [answer]:
                text += delta
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)
            yield self._chat_response(response, info, delta="")

        return gen()

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        response = await self.llm.achat(messages, **kwargs)
        answer = self._final_answer(response)
        relay: Relay | None = None
        if answer is not None:
            question, history = split_messages(messages)
            info, relay = self._corrector.open(question, answer, history, asynchronous=True)

        async def gen() -> ChatResponseAsyncGen:
            if answer is None:
                yield response
                return
            text = ""
            if relay is None:
                text = answer
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=text)
            else:
                async for delta in relay.adeltas():
                    text += delta
                    yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)
            yield self._chat_response(response, info, delta="")

        return gen()

    # -- complete ----------------------------------------------------------------------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        response = self.llm.complete(prompt, **kwargs)
        return self._completion_response(response, self._correct(prompt, None, response.text))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        response = await self.llm.acomplete(prompt, **kwargs)
        return self._completion_response(response, await self._acorrect(prompt, None, response.text))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        response = self.llm.complete(prompt, **kwargs)  # not stream_complete: see stream_chat
        info, relay = self._corrector.open(prompt, response.text)

        def gen() -> CompletionResponseGen:
            text = ""
            for delta in relay.deltas() if relay else [response.text]:
                text += delta
                yield CompletionResponse(text=text, delta=delta)
            yield self._completion_response(response, info, delta="")

        return gen()

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        response = await self.llm.acomplete(prompt, **kwargs)
        info, relay = self._corrector.open(prompt, response.text, asynchronous=True)

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            if relay is None:
                text = response.text
                yield CompletionResponse(text=text, delta=text)
            else:
                async for delta in relay.adeltas():
                    text += delta
                    yield CompletionResponse(text=text, delta=delta)
            yield self._completion_response(response, info, delta="")

        return gen()

    # -- tool calling: the wrapped LLM's ------------------------------------------------------

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
            tools, user_msg=user_msg, chat_history=chat_history, verbose=verbose,
            allow_parallel_tool_calls=allow_parallel_tool_calls, tool_required=tool_required, **kwargs,
        )

    def _validate_chat_with_tools_response(
        self, response: ChatResponse, tools: Sequence[Any], allow_parallel_tool_calls: bool = False, **kwargs: Any
    ) -> ChatResponse:
        return self._tool_llm()._validate_chat_with_tools_response(
            response, tools, allow_parallel_tool_calls=allow_parallel_tool_calls, **kwargs
        )

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        return self._tool_llm().get_tool_calls_from_response(response, error_on_no_tool_call=error_on_no_tool_call, **kwargs)

    def _tool_llm(self) -> FunctionCallingLLM:
        if not isinstance(self.llm, FunctionCallingLLM):
            raise TypeError(f"{type(self.llm).__name__} is not a function-calling LLM: it cannot call tools")
        return self.llm

    # -- helpers -----------------------------------------------------------------------------

    def _correct(self, question: str, history: list[dict[str, str]] | None, answer: str) -> dict[str, Any]:
        if not answer.strip():
            return self._corrector.skipped(answer, "empty answer")
        return self._corrector.correct(question, answer, history)

    async def _acorrect(self, question: str, history: list[dict[str, str]] | None, answer: str) -> dict[str, Any]:
        if not answer.strip():
            return self._corrector.skipped(answer, "empty answer")
        return await self._corrector.acorrect(question, answer, history)

    def _final_answer(self, response: ChatResponse) -> str | None:
        """The text to correct, or None for a response that calls tools (not a final answer)."""
        message = response.message
        if message.additional_kwargs.get("tool_calls") or any(isinstance(b, ToolCallBlock) for b in message.blocks):
            return None
        if isinstance(self.llm, FunctionCallingLLM):
            try:
                if self.llm.get_tool_calls_from_response(response, error_on_no_tool_call=False):
                    return None
            except Exception:  # noqa: S110 - an LLM that cannot parse tool calls made none
                pass
        return message.content or ""

    def _chat_response(self, upstream: ChatResponse, info: dict[str, Any], *, delta: str | None = None) -> ChatResponse:
        message = upstream.message.model_copy()
        message.content = info["text"]
        return ChatResponse(
            message=message, delta=delta, raw=self._raw(info), logprobs=None,
            additional_kwargs={**upstream.additional_kwargs, self.metadata_key: info},
        )

    def _completion_response(
        self, upstream: CompletionResponse, info: dict[str, Any], *, delta: str | None = None
    ) -> CompletionResponse:
        return CompletionResponse(
            text=info["text"], delta=delta, raw=self._raw(info),
            additional_kwargs={**upstream.additional_kwargs, self.metadata_key: info},
        )

    def _raw(self, info: dict[str, Any]) -> dict[str, Any]:
        return {"usage": usage(info.get("prompt_tokens", 0), info.get("completion_tokens", 0)), self.metadata_key: info}


def split_messages(messages: Sequence[ChatMessage]) -> tuple[str, list[dict[str, str]]]:
    """The question the Aligner sees, the last user message, and the turns before it as its history
    (without a user message: the whole conversation as the question, and no history)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == MessageRole.USER and (messages[i].content or "").strip():
            return messages[i].content or "", history_turns(messages[:i])
    return "\n".join(f"{m.role.value}: {m.content or ''}" for m in messages), []
