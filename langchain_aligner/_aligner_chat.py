"""The Aligner as a LangChain chat model, so LangChain itself opens, streams and closes its runs.

Tracers, token/cost views, ``astream_events`` and LangGraph's ``stream_mode="messages"`` learn about LLM work from
chat-model runs. ``AlignerRunnable`` therefore corrects through :class:`AlignerChatModel`, run with its own child
config: ``BaseChatModel`` opens the run named ``Aligner``, streams its tokens to callbacks (also inside ``invoke``
when a stream listens), reports its usage (the Aligner's own tokens) and sets the message id.

The conversation is the model's input, as the trace shows it: the earlier turns, the grounding context as one system
message (its items under ``additional_kwargs["context"]``), the question as a human message and the answer as an AI
message. The output is the corrected answer with ``response_metadata["aligner"]`` (the core's metadata); the stage
turns it back into a ``Correction`` with :func:`correction_of`. The answer's own message id is kept on the chunks and
the output, so LangGraph's ``stream_mode="messages"`` streams the corrected text once and dedupes the message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from langchain_core.caches import BaseCache
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import get_config_list
from pydantic import ConfigDict, PrivateAttr

from aligner_core import Aligner
from aligner_core.context import CONTEXT_HEADER, context_lines, normalize_context
from aligner_core.correction import Correction
from aligner_core.items import unpack

from ._inputs import Pair, history_turns

#: The run's name in traces and ``astream_events``.
RUN_NAME = "Aligner"
_KINDS = {"user": HumanMessage, "assistant": AIMessage, "system": SystemMessage}


def conversation(pair: Pair) -> list[BaseMessage]:
    """The model's input for ``pair``: history, context (one system message), question, answer (with its id)."""
    messages: list[BaseMessage] = [_KINDS[t["role"]](t["content"]) for t in pair.history]
    if pair.context:
        items = [dict(c) for c in pair.context]
        text = CONTEXT_HEADER + context_lines(normalize_context(items))
        messages.append(SystemMessage(text, additional_kwargs={"context": items}))
    own_id = getattr(pair.answer, "id", None)
    return [
        *messages,
        HumanMessage(pair.question),
        AIMessage(pair.text, id=own_id if isinstance(own_id, str) else None),
    ]


def _request(messages: Sequence[BaseMessage]) -> dict[str, Any]:
    """The core's pair (a batch item, ``aligner_core.items``) for a conversation built by :func:`conversation`."""
    *earlier, question, answer = messages
    context = None
    if earlier and isinstance(earlier[-1], SystemMessage) and "context" in earlier[-1].additional_kwargs:
        context = earlier.pop().additional_kwargs["context"]
    return {
        "question": question.text,
        "answer": answer.text,
        "history": list(history_turns(earlier)) or None,
        "context": context,
    }


def _message(
    correction: Correction, model: str, *, id: str | None, text: str | None = None
) -> dict[str, Any]:
    """The fields of the output message (or of the last chunk, whose ``text`` is empty)."""
    usage = UsageMetadata(
        input_tokens=correction.prompt_tokens,
        output_tokens=correction.completion_tokens,
        total_tokens=correction.prompt_tokens + correction.completion_tokens,
    )
    meta = {
        "model_name": model,
        "finish_reason": correction.finish_reason,
        "latency_s": correction.latency_s,
        "aligner": dict(correction.metadata),
    }
    content = correction.text if text is None else text
    return {"content": content, "id": id, "usage_metadata": usage, "response_metadata": meta}


def correction_of(message: BaseMessage, pair: Pair) -> Correction:
    """The ``Correction`` an :class:`AlignerChatModel` output (or its merged chunks) reports for ``pair``."""
    meta, usage = message.response_metadata, getattr(message, "usage_metadata", None) or {}
    return Correction.build(
        question=pair.question,
        original=pair.text,
        text=message.text,
        prompt_tokens=usage.get("input_tokens", 0),
        completion_tokens=usage.get("output_tokens", 0),
        finish_reason=meta.get("finish_reason", "stop"),
        latency_s=meta.get("latency_s", 0.0),
        metadata=meta.get("aligner", {}),
    )


class AlignerChatModel(BaseChatModel):
    """Corrects the last AI message of a conversation against the human message before it (internal).

    Call options are the core's generation options (``max_new_tokens``, ``temperature``, ...; ``stop`` too).
    """

    aligner: Aligner
    """The corrector."""
    timeout: float | None = None
    """Seconds one ``invoke``/``ainvoke`` may take (``CorrectionTimeoutError`` past it); streams are bounded by their
    tokens."""
    gate: dict[str, Any] = {}
    """The inspector keywords for the core (``inspector``, ``threshold``), only those set."""
    name: str | None = RUN_NAME
    cache: BaseCache | bool | None = False  # a correction depends on more than the messages a cache keys on

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")
    _planned: Correction | BaseException | None = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "aligner"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.aligner.name, "engine": self.aligner.engine.name}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="aligner", ls_model_name=self.aligner.name, ls_model_type="chat")
        if kwargs.get("do_sample") and kwargs.get("temperature") is not None:
            params["ls_temperature"] = kwargs["temperature"]
        if kwargs.get("max_new_tokens") is not None:
            params["ls_max_tokens"] = kwargs["max_new_tokens"]
        if stop:
            params["ls_stop"] = list(stop)
        return params

    def _options(self, stop: Sequence[str] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.gate, **kwargs, **({"stop": stop} if stop is not None else {})}

    def _result(self, correction: Correction, messages: Sequence[BaseMessage]) -> ChatResult:
        message = AIMessage(**_message(correction, self.aligner.name, id=messages[-1].id))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if isinstance(self._planned, BaseException):
            raise self._planned
        if self._planned is not None:
            return self._result(self._planned, messages)
        item = unpack(_request(messages))
        correction = self.aligner.correct(
            item.question,
            item.answer,
            history=item.history,
            context=item.context,
            timeout=self.timeout,
            **self._options(stop, kwargs),
        )
        return self._result(correction, messages)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        item = unpack(_request(messages))
        correction = await self.aligner.acorrect(
            item.question,
            item.answer,
            history=item.history,
            context=item.context,
            timeout=self.timeout,
            **self._options(stop, kwargs),
        )
        return self._result(correction, messages)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        item, own_id = unpack(_request(messages)), messages[-1].id
        stream = self.aligner.stream(
            item.question,
            item.answer,
            history=item.history,
            context=item.context,
            **self._options(stop, kwargs),
        )
        try:
            for delta in stream:
                yield ChatGenerationChunk(message=AIMessageChunk(content=delta, id=own_id))
        finally:
            stream.close()
        assert stream.correction is not None  # a stream that ends cleanly holds its correction
        last = _message(stream.correction, self.aligner.name, id=own_id, text="")
        yield ChatGenerationChunk(message=AIMessageChunk(**last, chunk_position="last"))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        item, own_id = unpack(_request(messages)), messages[-1].id
        stream = self.aligner.astream(
            item.question,
            item.answer,
            history=item.history,
            context=item.context,
            **self._options(stop, kwargs),
        )
        try:
            async for delta in stream:
                yield ChatGenerationChunk(message=AIMessageChunk(content=delta, id=own_id))
        finally:
            await stream.aclose()
        assert stream.correction is not None
        last = _message(stream.correction, self.aligner.name, id=own_id, text="")
        yield ChatGenerationChunk(message=AIMessageChunk(**last, chunk_position="last"))

    def batch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """One planned ``correct_batch`` pass per ``max_concurrency`` inputs, then one run per input reporting its
        correction.

        ``BaseChatModel`` has no batch hook (its ``batch`` invokes the model once per input), and the Aligner's
        batch is worth more than concurrent single calls (length-sorted, padded, one token budget). So the pass runs
        first and each input's ``Aligner`` run then reports its planned result (its tokens do not stream).
        """
        configs = get_config_list(config, len(inputs))
        limit = configs[0].get("max_concurrency") if configs else None
        step = max(1, int(limit)) if limit else max(len(inputs), 1)
        options = self._options(kwargs.get("stop"), {k: v for k, v in kwargs.items() if k != "stop"})
        results: list[Correction | BaseException] = []
        for k in range(0, len(inputs), step):
            pairs = [_request(messages) for messages in inputs[k : k + step]]
            try:
                results += self.aligner.correct_batch(pairs, return_exceptions=True, **options)
            except Exception as exc:  # a bad option: every correction of this pass fails with it
                results += [exc] * len(pairs)
        outs: list[Any] = []
        for messages, one, result in zip(inputs, configs, results):
            replay = self.model_copy(update={"disable_streaming": True})
            replay._planned = result
            try:
                outs.append(replay.invoke(messages, one, **kwargs))
            except Exception as exc:
                if not return_exceptions:
                    raise
                outs.append(exc)
        return outs


__all__ = ["RUN_NAME", "AlignerChatModel", "conversation", "correction_of"]
