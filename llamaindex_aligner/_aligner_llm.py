"""The Aligner as a LlamaIndex LLM, so that LlamaIndex reports each of its generations itself.

Token and cost views count LLM calls. LlamaIndex's ``llm_completion_callback`` reports every ``complete`` /
``stream_complete`` (and async) call of an LLM: instrumentation ``LLMCompletionStartEvent`` / ``...InProgressEvent``
/ ``...EndEvent`` (root dispatcher handlers: Phoenix, Langfuse, OpenTelemetry) and the callback manager's
``CBEventType.LLM`` events (``TokenCountingHandler``, ``LlamaDebugHandler``). So the adapters ask the Aligner for a
correction through :class:`AlignerLLM`: the prompt it is called with is a :class:`Request`, the Aligner's rendered
prompt (what the events show) carrying the pair it was rendered from, and the completion it returns holds the
exact token counts in ``raw["usage"]`` (read by ``TokenCountingHandler`` before it estimates), the ``Correction``
in ``raw["correction"]``, and the finish reason and the inspector's verdict in ``additional_kwargs``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, TypeVar

from llama_index.core.base.llms.types import (
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from aligner_core import Aligner, Correction
from aligner_core.context import normalize_context
from aligner_core.history import normalize_history, render_prompt
from aligner_core.items import Item

T = TypeVar("T")
#: The inspector's verdict in a correction's metadata, reported in the completion's ``additional_kwargs``.
VERDICT = ("inspector_score", "inspector_threshold", "inspector_passed")


class Slot:
    """A pair's place in a batch, read as the core's streams are (no deltas: the whole correction at the end, or
    the error). A batched pair's LLM call is a stream of a slot: it opens before the batch runs and ends when the
    slot, filled in, is read."""

    def __init__(self) -> None:
        self.correction: Correction | None = None
        self.error: BaseException | None = None

    def fill(self, result: Correction | BaseException) -> None:
        if isinstance(result, BaseException):
            self.error = result
        else:
            self.correction = result

    def __iter__(self) -> Iterator[str]:
        if self.error is not None:
            raise self.error
        return iter(())

    def close(self) -> None:
        """Nothing to stop: the batch has run."""


class Request(str):
    """The Aligner's rendered prompt, the text LlamaIndex reports, carrying the pair it was rendered from (and, for
    a pair corrected in a batch, the :class:`Slot` its result arrives in)."""

    item: Item
    slot: Slot | None

    def __new__(cls, aligner: Aligner, item: Item, slot: Slot | None = None) -> Request:
        request = super().__new__(cls, render(aligner, item))
        request.item, request.slot = item, slot
        return request


class AlignerLLM(CustomLLM):
    """The Aligner over one adapter's pairs, as a LlamaIndex LLM whose calls LlamaIndex reports (see the module).

    ``component`` names the adapter in the reported model (``model_dict``), beside the Aligner's model, template
    and engine; ``gate`` is the adapter's inspector and threshold, when set (else the Aligner's own apply).
    """

    model: str = Field(default="", description="The Aligner's model name.")
    template: str = Field(default="", description="The Aligner's template.")
    engine: str = Field(default="", description="The Aligner's engine.")
    component: str = Field(default="", description="The adapter the corrections are for.")

    _aligner: Aligner = PrivateAttr()
    _gate: dict[str, Any] = PrivateAttr(default_factory=dict)

    def __init__(self, aligner: Aligner, *, component: str, gate: Mapping[str, Any] | None = None) -> None:
        super().__init__(
            model=aligner.name,
            template=aligner.template.name,
            engine=aligner.engine.name,
            component=component,
        )
        self._aligner, self._gate = aligner, dict(gate or {})

    @classmethod
    def class_name(cls) -> str:
        return "Aligner"

    @property
    def metadata(self) -> LLMMetadata:
        window = getattr(self._aligner.engine, "context_length", None)
        return LLMMetadata(
            model_name=self.model or "aligner",
            num_output=self._aligner.defaults.max_new_tokens,
            **({"context_window": window} if window else {}),
        )

    def to_payload(self) -> dict[str, Any]:
        """What the events record as the model: the metadata, and which Aligner and adapter."""
        return {
            **super().to_payload(),
            **self.model_dump(include={"model", "template", "engine", "component"}),
        }

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return completion(self._call(self._aligner.correct, prompt, kwargs))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return completion(await self._call(self._aligner.acorrect, prompt, kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        slot = request_of(prompt).slot
        return completions(slot if slot is not None else self._call(self._aligner.stream, prompt, kwargs))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        return acompletions(self._call(self._aligner.astream, prompt, kwargs))

    def _call(self, method: Callable[..., T], prompt: str, options: Mapping[str, Any]) -> T:
        return call(method, request_of(prompt).item, {**self._gate, **options})


def call(method: Callable[..., T], item: Item, options: Mapping[str, Any]) -> T:
    """The Aligner's ``correct``, ``acorrect``, ``stream`` or ``astream`` on a pair."""
    return method(item.question, item.answer, history=item.history, context=item.context, **options)


def request_of(prompt: str) -> Request:
    if not isinstance(prompt, Request):
        raise TypeError("AlignerLLM corrects pairs: call it with a Request, not a prompt string")
    return prompt


def completion(correction: Correction, delta: str | None = None) -> CompletionResponse:
    """A correction as a LlamaIndex completion: its text, exact usage, finish reason and verdict."""
    prompt, generated = correction.prompt_tokens, correction.completion_tokens
    usage = {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}
    verdict = {k: correction.metadata[k] for k in VERDICT if k in correction.metadata}
    return CompletionResponse(
        text=correction.text,
        delta=delta,
        raw={"usage": usage, "correction": correction},
        additional_kwargs={"finish_reason": correction.finish_reason, **verdict},
    )


def correction_of(response: CompletionResponse | None) -> Correction:
    """The Correction an AlignerLLM completion (or the last response of its stream) carries."""
    correction = (response.raw or {}).get("correction") if response is not None else None
    if not isinstance(correction, Correction):
        raise RuntimeError("the Aligner's stream ended without a correction")
    return correction


def completions(stream: Any) -> Iterator[CompletionResponse]:
    """A core correction stream as LlamaIndex stream responses: one per delta, then the whole completion (with an
    empty delta). Closing this generator stops the generation."""
    text, finished = "", False
    try:
        for delta in stream:
            text += delta
            yield CompletionResponse(text=text, delta=delta)
        finished = True
    finally:
        if not finished:
            stream.close()
    yield completion(_finished(stream), delta="")


async def acompletions(stream: Any) -> AsyncIterator[CompletionResponse]:
    text, finished = "", False
    try:
        async for delta in stream:
            text += delta
            yield CompletionResponse(text=text, delta=delta)
        finished = True
    finally:
        if not finished:
            stream.close()
    yield completion(_finished(stream), delta="")


def _finished(stream: Any) -> Correction:
    if stream.correction is None:
        raise RuntimeError("the Aligner's stream ended without a correction")
    return stream.correction


def render(aligner: Aligner, item: Item) -> str:
    """The Aligner's prompt for a pair with its history and context (before any trimming for length); a chat
    template left to a server is shown as its messages. Never raises: the Aligner reports a bad pair itself."""
    try:
        turns, grounding = normalize_history(item.history), normalize_context(item.context)
    except Exception:
        turns, grounding = (), ()
    try:
        return render_prompt(aligner.template, item.question, item.answer, turns, grounding)
    except Exception:  # e.g. a chat template without a local tokenizer: the server renders it
        messages = getattr(aligner.template, "messages", None)
        if messages is None:
            return f"{item.question}\n\n{item.answer}"
        return str(messages(question=item.question, answer=item.answer, history=turns, context=grounding))
