"""AlignedLLM: any LlamaIndex LLM whose final answers are corrected by an Aligner (for chat engines and agents).

The counterpart of LangChain's ``AlignedChatModel``. It tells the answer the user reads from LlamaIndex's own
intermediate calls by the call site (``_calls``), grounds the correction on what the call was given
(``_grounding``) and lets the core decide (``aligner_core.decision``). Streaming is safe by construction: the
wrapped LLM is always called *without* streaming, and only the Aligner's correction is streamed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from aligner_core import Aligner
from aligner_core.errors import missing
from aligner_core.reporting import OnError

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
    )
    from llama_index.core.bridge.pydantic import Field, PrivateAttr, SerializeAsAny
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.llm import LLM
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing("llama-index-core", "llamaindex", feature="llamaindex_aligner") from exc

from ._calls import given, read_call
from ._correct import Corrector
from ._plan import Plan, plan_chat, plan_completion, with_text
from ._serialize import aligner_spec, load_aligner, rebuild_llm
from ._streams import asent, sent
from ._tools import ToolCalling

COMPONENT = "llm"
T = TypeVar("T")


class AlignedLLM(ToolCalling):
    """Wraps a LlamaIndex LLM: the answers it writes for the user are corrected, its intermediate steps are not.

    Which call is which is read from the call site (see docs/llamaindex.md): response synthesizers, the simple
    chat engine, function-calling agents and your own code write answers (corrected); LlamaIndex's condensing,
    query rewriting, routing and ReAct actions are intermediate (passed through, ``skipped: "intermediate_step"``);
    a ReAct agent's final step has only its ``Answer:`` corrected; structured-output programs pass through
    (``correct_structured=True`` corrects and keeps the result only if it validates); tool calls pass through.
    ``with aligner_core.step("final" | "intermediate")`` overrides all of it.

    The question is the prompt's ``query_str`` or the last user message, the history the messages before it,
    and the context what the answer is grounded on (the prompt's ``context_str``, tool calls and results). The
    details go to ``response.additional_kwargs[metadata_key]`` and ``response.raw[metadata_key]``;
    ``response.raw["usage"]`` holds the correction's token counts. ``stream_*`` variants stream **only** the
    correction. The metadata and prompt formatting are the wrapped LLM's: ``complete`` hands it the prompt
    unformatted.
    """

    llm: SerializeAsAny[LLM] = Field(description="The LLM whose final answers are corrected.")
    on_error: OnError = Field(
        default="raise",
        description="'raise' propagates Aligner failures; 'passthrough' serves the uncorrected answer.",
    )
    generation_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Generation options for the Aligner (max_new_tokens, stop, ...)."
    )
    metadata_key: str = Field(
        default="aligner", min_length=1, description="Key under which the correction is recorded."
    )
    correct_structured: bool = Field(
        default=False,
        description="Correct structured output too, keeping a correction only if it validates against the schema.",
    )
    inspector: Any = Field(
        default=None,
        exclude=True,
        description="Scores (question, answer) in [0, 1] (1: aligned) first: an Inspector or a callable.",
    )
    threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="An answer scoring at or above it is returned unchanged, with no correction generated; "
        "None: the Aligner's.",
    )
    include_original: bool = Field(
        default=False,
        description="Record the uncorrected answer as 'original' in the details (off: they travel with the "
        "response, agent event streams included).",
    )

    _corrector: Corrector = PrivateAttr()

    def __init__(self, llm: LLM, aligner: Aligner, **kwargs: Any) -> None:
        if not isinstance(llm, LLM):
            raise TypeError(f"llm must be a LlamaIndex LLM, got {type(llm).__name__}")
        kwargs.setdefault("callback_manager", llm.callback_manager)
        super().__init__(llm=llm, **kwargs)
        # No callback_manager: this call is itself the LLM call LlamaIndex reports (its raw usage the correction's).
        self._corrector = Corrector(
            aligner,
            component=COMPONENT,
            on_error=self.on_error,
            generation_kwargs=self.generation_kwargs,
            inspector=self.inspector,
            threshold=self.threshold,
            include_original=self.include_original,
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

    # -- serialization: the Aligner by name, the wrapped LLM by its class_name ---------------------

    def to_dict(self, **kwargs: Any) -> dict[str, Any]:
        """The settings, the wrapped LLM's ``to_dict()`` under ``"llm"``, and ``"aligner"``: the Aligner's model,
        template and engine (not its weights)."""
        return {**super().to_dict(**kwargs), "aligner": aligner_spec(self.aligner)}

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], aligner: Aligner | None = None, llm: LLM | None = None, **kwargs: Any
    ) -> AlignedLLM:
        """Rebuild from :meth:`to_dict`. ``aligner=`` / ``llm=`` reuse loaded ones; without them the Aligner is
        loaded by name and the wrapped LLM rebuilt by its ``class_name`` (a ``ValueError`` says when it cannot)."""
        data = {**data, **kwargs}
        data.pop("class_name", None)
        spec, recorded = data.pop("aligner", None), data.pop("llm", None)
        wrapped = llm if llm is not None else rebuild_llm(recorded, cls.class_name())
        return cls(
            llm=wrapped,
            aligner=aligner if aligner is not None else load_aligner(spec, cls.class_name()),
            **data,
        )

    # -- prompts: what LlamaIndex says about the call ----------------------------------------------

    def predict(self, prompt: Any, **prompt_args: Any) -> str:
        with given(prompt, prompt_args, self):
            return super().predict(prompt, **prompt_args)

    def stream(self, prompt: Any, **prompt_args: Any) -> Any:
        with given(prompt, prompt_args, self):
            return super().stream(prompt, **prompt_args)

    async def apredict(self, prompt: Any, **prompt_args: Any) -> str:
        with given(prompt, prompt_args, self):
            return await super().apredict(prompt, **prompt_args)

    async def astream(self, prompt: Any, **prompt_args: Any) -> Any:
        with given(prompt, prompt_args, self):
            return await super().astream(prompt, **prompt_args)

    # -- chat --------------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = read_call()
        response = self.llm.chat(messages, **kwargs)
        plan = self._plan_chat(call, messages, response)
        return self._chat_response(response, plan, self._corrector.correct(*_args(plan)))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = read_call()
        response = await self.llm.achat(messages, **kwargs)
        plan = self._plan_chat(call, messages, response)
        return self._chat_response(response, plan, await self._corrector.acorrect(*_args(plan)))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        call = read_call()
        response = self.llm.chat(messages, **kwargs)  # not stream_chat: its tokens must not reach the caller
        plan = self._plan_chat(call, messages, response)
        info, deltas = self._open(plan)
        return _chunks(deltas, _chat_chunk, lambda: self._chat_response(response, plan, info, delta=""))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        call = read_call()
        response = await self.llm.achat(messages, **kwargs)
        plan = self._plan_chat(call, messages, response)
        info, deltas = await self._aopen(plan)
        return _achunks(deltas, _chat_chunk, lambda: self._chat_response(response, plan, info, delta=""))

    # -- complete ----------------------------------------------------------------------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        call = read_call()
        response = self.llm.complete(prompt, **kwargs)
        plan = plan_completion(call, prompt, response.text, self.correct_structured)
        return self._completion_response(response, plan, self._corrector.correct(*_args(plan)))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        call = read_call()
        response = await self.llm.acomplete(prompt, **kwargs)
        plan = plan_completion(call, prompt, response.text, self.correct_structured)
        return self._completion_response(response, plan, await self._corrector.acorrect(*_args(plan)))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        call = read_call()
        response = self.llm.complete(prompt, **kwargs)  # not stream_complete: see stream_chat
        plan = plan_completion(call, prompt, response.text, self.correct_structured)
        info, deltas = self._open(plan)
        return _chunks(
            deltas, _completion_chunk, lambda: self._completion_response(response, plan, info, delta="")
        )

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        call = read_call()
        response = await self.llm.acomplete(prompt, **kwargs)
        plan = plan_completion(call, prompt, response.text, self.correct_structured)
        info, deltas = await self._aopen(plan)
        return _achunks(
            deltas, _completion_chunk, lambda: self._completion_response(response, plan, info, delta="")
        )

    # -- helpers -----------------------------------------------------------------------------

    def _plan_chat(self, call: Any, messages: Sequence[ChatMessage], response: ChatResponse) -> Plan:
        return plan_chat(call, messages, response, self._tool_calls_in, self.correct_structured)

    def _open(self, plan: Plan) -> tuple[dict[str, Any], Iterable[str]]:
        """The details (filled when the stream ends) and the deltas to send: the kept prefix, then the
        correction as it is generated (or, for an answer corrected whole or passed through, its text once)."""
        info, relay = self._corrector.open(*_args(plan))
        return info, sent(plan, relay.deltas() if relay else [info["text"]])

    async def _aopen(self, plan: Plan) -> tuple[dict[str, Any], AsyncIterator[str]]:
        info, relay = await self._corrector.aopen(*_args(plan))
        return info, asent(plan, relay, info["text"])

    def _chat_response(
        self, upstream: ChatResponse, plan: Plan, info: dict[str, Any], *, delta: str | None = None
    ) -> ChatResponse:
        message = (
            upstream.message
            if not plan.decision.corrects
            else with_text(upstream.message, plan.text(info["text"]))
        )
        details = _with_site(plan, info)
        return ChatResponse(
            message=message,
            delta=delta,
            raw=self._raw(details),
            logprobs=None,
            additional_kwargs={**upstream.additional_kwargs, self.metadata_key: details},
        )

    def _completion_response(
        self, upstream: CompletionResponse, plan: Plan, info: dict[str, Any], *, delta: str | None = None
    ) -> CompletionResponse:
        details = _with_site(plan, info)
        text = plan.text(info["text"]) if plan.decision.corrects else upstream.text
        return CompletionResponse(
            text=text,
            delta=delta,
            raw=self._raw(details),
            additional_kwargs={**upstream.additional_kwargs, self.metadata_key: details},
        )

    def _raw(self, info: dict[str, Any]) -> dict[str, Any]:
        """The correction's token counts as LlamaIndex token counters read them, and the details."""
        prompt, generated = info.get("prompt_tokens", 0), info.get("completion_tokens", 0)
        usage = {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}
        return {"usage": usage, self.metadata_key: info}


def _args(plan: Plan) -> tuple[Any, ...]:
    return plan.turn.question, plan.decision, plan.turn.history, plan.turn.context


def _with_site(plan: Plan, info: dict[str, Any]) -> dict[str, Any]:
    return {**info, "call_site": plan.site} if plan.site else info


def _chat_chunk(text: str, delta: str) -> ChatResponse:
    return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)


def _completion_chunk(text: str, delta: str) -> CompletionResponse:
    return CompletionResponse(text=text, delta=delta)


def _chunks(deltas: Iterable[str], chunk: Callable[[str, str], T], final: Callable[[], T]) -> Iterator[T]:
    """Stream responses of the deltas (each with the text so far), then the final response with the details."""
    text = ""
    for delta in deltas:
        text += delta
        yield chunk(text, delta)
    yield final()


async def _achunks(
    deltas: AsyncIterator[str], chunk: Callable[[str, str], T], final: Callable[[], T]
) -> AsyncIterator[T]:
    text = ""
    async for delta in deltas:
        text += delta
        yield chunk(text, delta)
    yield final()
