"""``AlignedChatModel``: a drop-in chat model whose answers are corrected by an Aligner."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableWithFallbacks
from langchain_core.runnables.base import RunnableBindingBase
from langchain_core.runnables.configurable import DynamicRunnable
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from aligner_core import Aligner
from aligner_core.decision import Structure
from aligner_core.inspector import Inspector
from aligner_core.reporting import OnError, check_on_error

from ._inputs import conversation_request
from ._nesting import calling, inner_configs
from ._quiet import ainvoke_in, invoke_in
from ._structured import structured_output
from .runnable import AlignerRunnable


def chat_model_of(runnable: Any) -> BaseChatModel | None:
    """The chat model inside ``with_retry``/``with_fallbacks``/``bind``/``configurable_*`` wrappers, if any."""
    for _ in range(16):
        if isinstance(runnable, BaseChatModel):
            return runnable
        if isinstance(runnable, RunnableBindingBase):
            runnable = runnable.bound
        elif isinstance(runnable, RunnableWithFallbacks):
            runnable = runnable.runnable
        elif isinstance(runnable, DynamicRunnable):
            runnable = runnable.default
        else:
            return None
    return None


class AlignedChatModel(BaseChatModel):
    """Calls the wrapped chat model, then corrects its answer against the last human message.

    The messages before it are the correction's history (human, AI and system messages; tool
    messages and AI messages that only call tools are skipped); the tool calls and tool results after
    it (an agent's current turn) are its grounding context.

    The result is the wrapped model's message with corrected content: its id, tool calls,
    ``usage_metadata`` (the wrapped model's tokens) and ``response_metadata`` are kept, and the
    correction's details are under ``response_metadata["aligner"]``. What is corrected is the core's
    decision: a message that calls tools (an agent step), a refusal or an intermediate step passes
    through unchanged with ``skipped`` in the details, and ``bind_tools`` delegates to the wrapped model.

    Streaming streams the correction only: the wrapped model runs to completion off every stream a
    user sees (``astream_events``, ``stream_events``, LangGraph's stream modes: its run is still traced,
    tagged ``aligner:uncorrected`` and ``nostream``), because an answer can only be corrected once it is
    complete; in LangGraph's ``stream_mode="messages"`` the corrected chunks and the final message share
    one id, so the corrected text streams once. ``stream_uncorrected=True`` is the explicit opt-in to let
    the wrapped model's raw events through as well.

    Standard parameters: ``max_tokens``, ``temperature``, ``stop``, ``timeout`` and ``max_retries``
    apply to the correction; ``model``, ``base_url`` and ``api_key`` name the Aligner when none is
    passed (``base_url``: an OpenAI-compatible server serving it, else ``model`` loads locally).
    """

    llm: Runnable[LanguageModelInput, BaseMessage]
    """The wrapped (upstream) chat model: any chat-model Runnable (``with_retry``, ``with_fallbacks``, ``bind``,
    a configurable ``init_chat_model()``)."""
    aligner: Aligner | None = None
    """The corrector (``aligner_core.Aligner``); built from ``model``/``base_url`` when not given."""
    model_name: str | None = Field(default=None, alias="model")
    """The Aligner's model: a hub id or local path, or with ``base_url`` the served model's name."""
    base_url: str | None = None
    """An OpenAI-compatible server (vLLM, ...) serving the Aligner, e.g. ``http://127.0.0.1:8000/v1``."""
    api_key: SecretStr | None = None
    """That server's API key."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds one correction may take (the HTTP timeout on a server built from ``base_url``)."""
    max_retries: int | None = Field(default=None, ge=0)
    """Retries of a correction that failed transiently (timeouts, an unreachable engine): LangChain's
    ``with_retry`` around the correction, or the server engine's own retries with ``base_url``."""
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
    stream_uncorrected: bool = False
    """Also let the wrapped model's uncorrected tokens reach callbacks and event streams (unsafe for UIs)."""
    inspector: Inspector | Callable[[str, str], float] | None = None
    """Scores each answer in [0, 1] first (1: aligned); one scoring at or above ``threshold`` is returned
    unchanged, with no correction generated (``aligner_core.inspector.Inspector`` or a callable). None: the
    Aligner's own inspector, if it was built with one."""
    threshold: float | None = None
    """The inspector's pass mark; None: the Aligner's."""
    correct_structured: bool = False
    """Correct structured output (``with_structured_output``) too, keeping a correction only when it still
    parses and validates against the schema; by default structured output passes through unchanged."""
    include_original: bool = False
    """Record the uncorrected answer as ``original`` in ``response_metadata["aligner"]``. Off by default: the
    message flows on to users (LangGraph state and stream modes carry it whole)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", populate_by_name=True)

    @field_validator("on_error", mode="before")
    @classmethod
    def _check_on_error(cls, value: Any) -> OnError:
        return check_on_error(value)

    @model_validator(mode="after")
    def _build_aligner(self) -> AlignedChatModel:
        """Load the Aligner named by ``model``/``base_url`` when none was passed."""
        if self.aligner is not None:
            return self
        if self.base_url:
            key = self.api_key.get_secret_value() if self.api_key else None
            options: dict[str, Any] = {"model": self.model_name, "api_key": key}
            if self.timeout is not None:
                options["timeout"] = self.timeout
            if self.max_retries is not None:
                options["max_retries"] = self.max_retries
            self.aligner = Aligner.from_server(self.base_url, **options)
        elif self.model_name:
            self.aligner = Aligner.from_pretrained(self.model_name)
        else:
            raise ValueError(
                "AlignedChatModel needs a corrector: pass aligner=Aligner..., or model='<hub id or path>', "
                "or base_url='http://host:port/v1' (and model='<served name>') for an Aligner on a server"
            )
        return self

    @property
    def _llm_type(self) -> str:
        return "aligned-chat-model"

    @property
    def upstream_name(self) -> str:
        """The wrapped model's name, as it reports it to tracing (``ls_model_name``, else its type)."""
        inner = chat_model_of(self.llm)
        if inner is None:
            try:
                return self.llm.get_name()
            except Exception:  # a configurable model builds its model (and name) only per call
                return type(self.llm).__name__
        # no public accessor gives the name a model reports to tracing (``asdict()`` is newer than langchain-core 1.0
        # and holds the type, not the model): read the model's own protected hooks
        name = inner._get_ls_params().get("ls_model_name")
        return name if isinstance(name, str) and name else inner._llm_type

    @property
    def _identifying_params(self) -> dict[str, Any]:
        assert self.aligner is not None
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
            ls_model_type="chat",
            ls_model_name=model if isinstance(model, str) else self.upstream_name,
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
        """Let the wrapped model bind the tools (its format, its ``tool_choice``); answers with tool calls pass through."""
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        bind = getattr(self.llm, "bind_tools", None)
        if bind is None:
            raise NotImplementedError(
                f"the wrapped {type(self.llm).__name__} cannot bind tools: bind them before wrapping it "
                "(llm.bind_tools(tools).with_retry()), then pass that as llm="
            )
        return self.model_copy(update={"llm": bind(tools, **kwargs)}).bind()

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Structured output from the wrapped model, honouring ``method``.

        A structured answer is data, not prose: the wrapped model's own ``with_structured_output`` produces it
        (off every user stream) and it passes through unchanged, ``skipped: "structured_output"`` in the raw
        message's ``response_metadata["aligner"]`` (``include_raw=True`` shows it). With ``correct_structured``
        it is corrected and the correction kept only if it still parses and validates against ``schema``.
        """
        return structured_output(
            self.llm,
            schema,
            method=method,
            include_raw=include_raw,
            stage=self._stage,
            hide_upstream=not self.stream_uncorrected,
            **kwargs,
        )

    # -- the pieces of one call ------------------------------------------------------------------

    def _stops(self, stop: list[str] | None) -> list[str]:
        return [*(self.stop or []), *(stop or [])]

    def _stage(self, stop: list[str] | None = None, structure: Structure | None = None) -> AlignerRunnable:
        """The correction stage of one call (the wrapped model runs off user streams: the stage is guarded)."""
        options: dict[str, Any] = {}
        if self.max_tokens is not None:
            options["max_new_tokens"] = self.max_tokens
        if self.temperature:
            options.update(do_sample=True, temperature=self.temperature)
        if stops := self._stops(stop):
            options["stop"] = stops
        on_server = self.base_url is not None  # the server engine applies timeout and retries itself
        stage = AlignerRunnable(
            aligner=self.aligner,
            on_error=self.on_error,
            generation_kwargs=options,
            timeout=None if on_server else self.timeout,
            max_retries=0 if on_server else (self.max_retries or 0),
            inspector=self.inspector,
            threshold=self.threshold,
            structure=structure,
            correct_structured=self.correct_structured,
            include_original=self.include_original,
        )
        stage._guarded = True
        return stage

    def _named(self, message: AIMessage) -> AIMessage:
        if "model_name" in message.response_metadata:
            return message
        return message.model_copy(
            update={"response_metadata": {"model_name": self.upstream_name, **message.response_metadata}}
        )

    def _call_options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        stops = self._stops(stop)
        return {**({"stop": stops} if stops else {}), **kwargs}

    # -- the Runnable entry points: each call's run id and config reach the hooks ----------------------

    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        """``BaseChatModel.invoke``; the caller's ``configurable`` values reach the wrapped model."""
        with calling(self, config) as config:
            return super().invoke(input, config, stop=stop, **kwargs)

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        """Async :meth:`invoke`."""
        with calling(self, config) as config:
            return await super().ainvoke(input, config, stop=stop, **kwargs)

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        """Stream the correction (``BaseChatModel.stream``, with the nested runs traced under this one)."""
        with calling(self, config) as config:
            yield from super().stream(input, config, stop=stop, **kwargs)

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        """Async :meth:`stream`."""
        with calling(self, config) as config:
            async for chunk in super().astream(input, config, stop=stop, **kwargs):
                yield chunk

    # -- the hooks -------------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        up, down = inner_configs(self, run_manager, hide_upstream=not self.stream_uncorrected)
        answer = invoke_in(self.llm, messages, up, **self._call_options(stop, kwargs))
        message = self._stage(stop).invoke({**conversation_request(messages), "answer": answer}, down)
        return ChatResult(generations=[ChatGeneration(message=self._named(message))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        up, down = inner_configs(self, run_manager, hide_upstream=not self.stream_uncorrected)
        answer = await ainvoke_in(self.llm, messages, up, **self._call_options(stop, kwargs))
        message = await self._stage(stop).ainvoke({**conversation_request(messages), "answer": answer}, down)
        return ChatResult(generations=[ChatGeneration(message=self._named(message))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        up, down = inner_configs(self, run_manager, hide_upstream=not self.stream_uncorrected)
        answer = invoke_in(self.llm, messages, up, **self._call_options(stop, kwargs))
        for chunk in self._stage(stop).stream({**conversation_request(messages), "answer": answer}, down):
            yield ChatGenerationChunk(message=self._named(chunk) if chunk.chunk_position == "last" else chunk)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        up, down = inner_configs(self, run_manager, hide_upstream=not self.stream_uncorrected)
        answer = await ainvoke_in(self.llm, messages, up, **self._call_options(stop, kwargs))
        async for chunk in self._stage(stop).astream(
            {**conversation_request(messages), "answer": answer}, down
        ):
            yield ChatGenerationChunk(message=self._named(chunk) if chunk.chunk_position == "last" else chunk)
