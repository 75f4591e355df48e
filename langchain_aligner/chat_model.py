"""``AlignedChatModel``: a drop-in chat model whose answers are corrected by an Aligner."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManager, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig
from langchain_core.tools import BaseTool
from pydantic import ConfigDict

from aligner_core import Aligner

from ._io import last_human_text
from .runnable import AlignerRunnable, OnError


class AlignedChatModel(BaseChatModel):
    """Calls the wrapped chat model, then corrects its answer against the last human message.

    The result is the wrapped model's message with corrected content: its id, tool calls,
    ``usage_metadata`` (the wrapped model's tokens) and ``response_metadata`` are kept, and the
    correction's details are under ``response_metadata["aligner"]``. A message that only calls
    tools passes through untouched, and ``bind_tools`` delegates to the wrapped model. Streaming
    streams the correction (the wrapped model's answer has to be complete before it can be corrected).
    """

    llm: BaseChatModel
    """The wrapped (upstream) chat model."""
    aligner: Aligner
    """The corrector (``aligner_core.Aligner``)."""
    on_error: OnError = "raise"
    """``"passthrough"`` returns the wrapped model's answer when the corrector fails (error in metadata)."""
    max_tokens: int | None = None
    """Most new tokens of a correction (the Aligner's ``max_new_tokens``); None keeps the Aligner's default."""
    temperature: float | None = None
    """Sampling temperature of the corrector; None or 0 decodes greedily."""
    stop: list[str] | None = None
    """Stop strings for both the wrapped model and the corrector; a call's ``stop`` adds to them."""
    streaming: bool = False
    """Whether ``invoke`` streams internally, so streaming callbacks see the correction's tokens."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    @property
    def _llm_type(self) -> str:
        return "aligned-chat-model"

    @property
    def upstream_name(self) -> str:
        """The wrapped model's name, as it reports it to tracing."""
        name = self.llm._get_ls_params().get("ls_model_name")
        return name if isinstance(name, str) and name else self.llm._llm_type

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "llm": self.upstream_name,
            "aligner": self.aligner.name,
            "on_error": self.on_error,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.get("model")
        params = LangSmithParams(
            ls_provider="aligner",
            ls_model_name=model if isinstance(model, str) else self.upstream_name,
            ls_model_type="chat",
        )
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        if self.max_tokens is not None:
            params["ls_max_tokens"] = self.max_tokens
        if stops := self._stops(stop):
            params["ls_stop"] = stops
        return params

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Let the wrapped model format the tools, and forward what it binds on every call."""
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        bound = self.llm.bind_tools(tools, **kwargs)
        if not (isinstance(bound, RunnableBinding) and bound.bound is self.llm):
            raise NotImplementedError(
                f"{type(self.llm).__name__}.bind_tools returned {type(bound).__name__}; AlignedChatModel can only "
                "forward tools that the wrapped model binds as call keyword arguments"
            )
        return self.bind(**bound.kwargs)

    # -- the hooks -------------------------------------------------------------------------------

    def _stops(self, stop: list[str] | None) -> list[str]:
        return [*(self.stop or []), *(stop or [])]

    def _stage(self, messages: list[BaseMessage], stop: list[str] | None) -> AlignerRunnable:
        options: dict[str, Any] = {}
        if self.max_tokens is not None:
            options["max_new_tokens"] = self.max_tokens
        if self.temperature:
            options.update(do_sample=True, temperature=self.temperature)
        if stops := self._stops(stop):
            options["stop"] = stops
        question = last_human_text(messages) or ""
        return AlignerRunnable(aligner=self.aligner, question=question, on_error=self.on_error, generation_kwargs=options)

    @staticmethod
    def _child(run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None) -> RunnableConfig | None:
        """A config whose runs nest under this chat model run (what ``ParentRunManager.get_child`` does)."""
        if run_manager is None:
            return None
        manager = CallbackManager(handlers=[], parent_run_id=run_manager.run_id)
        manager.set_handlers(run_manager.inheritable_handlers)
        manager.add_tags(run_manager.inheritable_tags)
        manager.add_metadata(run_manager.inheritable_metadata)
        return RunnableConfig(callbacks=manager)

    def _named(self, message: AIMessage) -> AIMessage:
        if "model_name" in message.response_metadata:
            return message
        return message.model_copy(update={"response_metadata": {"model_name": self.upstream_name, **message.response_metadata}})

    def _chunk(self, chunk: AIMessageChunk) -> ChatGenerationChunk:
        return ChatGenerationChunk(message=self._named(chunk) if chunk.chunk_position == "last" else chunk)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        config = self._child(run_manager)
        answer = self.llm.invoke(messages, config, stop=self._stops(stop) or None, **kwargs)
        message = self._stage(messages, stop).invoke(answer, config)
        return ChatResult(generations=[ChatGeneration(message=self._named(message))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        config = self._child(run_manager)
        answer = await self.llm.ainvoke(messages, config, stop=self._stops(stop) or None, **kwargs)
        message = await self._stage(messages, stop).ainvoke(answer, config)
        return ChatResult(generations=[ChatGeneration(message=self._named(message))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        config = self._child(run_manager)
        answer = self.llm.invoke(messages, config, stop=self._stops(stop) or None, **kwargs)
        for chunk in self._stage(messages, stop).stream(answer, config):
            yield self._chunk(chunk)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        config = self._child(run_manager)
        answer = await self.llm.ainvoke(messages, config, stop=self._stops(stop) or None, **kwargs)
        async for chunk in self._stage(messages, stop).astream(answer, config):
            yield self._chunk(chunk)
