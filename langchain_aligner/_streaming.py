"""Streaming for ``AlignerRunnable``: gather the streamed answer, then stream its correction as deltas.

The deltas are the chunks of the internal ``Aligner`` chat model's own ``stream`` (LangChain reports each as a token
of that run). A ``str`` answer streams ``str`` deltas; a message answer streams ``AIMessageChunk`` deltas and one last
chunk carrying the tool calls, usage and ``response_metadata["aligner"]``, so the chunks add up to what ``invoke``
returns. A failure before the first delta is settled like one in ``invoke`` (``on_error``); after it, it raises:
what was sent cannot be taken back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForChainRun,
    CallbackManagerForChainRun,
    adispatch_custom_event,
    dispatch_custom_event,
)
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessageChunk
from langchain_core.runnables import Runnable, RunnableConfig

from aligner_core import Correction

from ._aligner_chat import conversation, correction_of
from ._inputs import Pair, merge
from ._outputs import to_chunk

#: Each call is a "chain" run: an "llm" run would make tracers count the upstream's usage_metadata (kept on the
#: corrected AIMessage) a second time; the Aligner's own tokens are in its nested ``Aligner`` run.
RUN_TYPE = "chain"
#: Name of the custom callback event that carries each correction's details (or its error).
EVENT = "aligner_correction"


def _whole(result: Any) -> Any:
    """A whole output as one (last) chunk: passthroughs and untouched answers (a structured result as it is)."""
    if not isinstance(result, AIMessage):
        return result
    return AIMessageChunk(**{**to_chunk(result).model_dump(exclude={"type"}), "chunk_position": "last"})


def _sent(full: BaseMessageChunk | None) -> bool:
    """Whether corrected text already went out (the chunks so far hold some)."""
    return full is not None and bool(full.text)


def _delta(pair: Pair, text: str) -> str | AIMessageChunk:
    return text if isinstance(pair.answer, str) else AIMessageChunk(content=text, id=pair.answer.id)


def _tail(pair: Pair, out: Any) -> list[Any]:
    """After the deltas, a message answer gets one last chunk with its tool calls, usage and details."""
    if not isinstance(pair.answer, AIMessage):
        return []
    whole = to_chunk(out)
    rest = [b for b in whole.content if isinstance(b, dict) and b.get("type") != "text"]
    return [
        AIMessageChunk(
            content=rest or "",
            id=pair.answer.id,
            additional_kwargs=whole.additional_kwargs,
            response_metadata=whole.response_metadata,
            usage_metadata=whole.usage_metadata,
            tool_call_chunks=whole.tool_call_chunks,
            chunk_position="last",
        )
    ]


class StreamingStage:
    """``stream``/``transform`` and their async twins for ``AlignerRunnable`` (a mixin)."""

    if TYPE_CHECKING:

        def _pair(self, value: Any, config: RunnableConfig) -> Pair: ...
        def _corrector(self, pair: Pair | None = None) -> Runnable[Any, Any]: ...
        def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]: ...
        def _settle(self, pair: Pair, result: Correction | BaseException) -> tuple[Any, dict[str, Any]]: ...
        def _correct(self, pair: Pair, child: RunnableConfig, kwargs: dict[str, Any]) -> Any: ...
        async def _acorrect(self, pair: Pair, child: RunnableConfig, kwargs: dict[str, Any]) -> Any: ...
        def _refuse_unsafe_streams(self, callbacks: Any) -> None: ...
        @staticmethod
        def _child(run_manager: Any, config: RunnableConfig) -> RunnableConfig: ...
        def _transform_stream_with_config(self, *args: Any, **kwargs: Any) -> Iterator[Any]: ...
        def _atransform_stream_with_config(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]: ...

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        """Stream the correction: ``str`` deltas, or ``AIMessageChunk`` deltas for a message answer."""
        yield from self.transform(iter([input]), config, **kwargs)

    def transform(
        self, input: Iterator[Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        """In a streaming sequence: gather the streamed answer, then stream its correction."""
        self._refuse_unsafe_streams((config or {}).get("callbacks"))  # before the step before this one starts
        yield from self._transform_stream_with_config(
            input, self._transform, config, run_type=RUN_TYPE, **kwargs
        )

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """Async ``stream``."""

        async def once() -> AsyncIterator[Any]:
            yield input

        async for chunk in self.atransform(once(), config, **kwargs):
            yield chunk

    async def atransform(
        self, input: AsyncIterator[Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """Async ``transform``."""
        self._refuse_unsafe_streams((config or {}).get("callbacks"))  # before the step before this one starts
        async for chunk in self._atransform_stream_with_config(
            input, self._atransform, config, run_type=RUN_TYPE, **kwargs
        ):
            yield chunk

    def _transform(
        self,
        chunks: Iterator[Any],
        run_manager: CallbackManagerForChainRun,
        config: RunnableConfig,
        **kwargs: Any,
    ) -> Iterator[Any]:
        value = None
        for chunk in chunks:
            value = merge(value, chunk)
        pair, child = self._pair(value, config), self._child(run_manager, config)
        if not pair.streams:
            yield _whole(self._correct(pair, child, kwargs))
            return
        full: BaseMessageChunk | None = None
        messages = conversation(pair)
        try:
            for piece in self._corrector(pair).stream(messages, child, **self._options(kwargs)):
                full = piece if full is None else full + piece
                if piece.text:
                    yield _delta(pair, piece.text)
            assert full is not None
            result: Correction | BaseException = correction_of(full, pair)
        except Exception as exc:
            if _sent(full):  # deltas already went out: no passthrough
                raise
            result = exc
        out, meta = self._settle(pair, result)
        dispatch_custom_event(EVENT, meta, config=child)
        yield from _tail(pair, out) if _sent(full) else [_whole(out)]

    async def _atransform(
        self,
        chunks: AsyncIterator[Any],
        run_manager: AsyncCallbackManagerForChainRun,
        config: RunnableConfig,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        value = None
        async for chunk in chunks:
            value = merge(value, chunk)
        pair, child = self._pair(value, config), self._child(run_manager, config)
        if not pair.streams:
            yield _whole(await self._acorrect(pair, child, kwargs))
            return
        full: BaseMessageChunk | None = None
        messages = conversation(pair)
        try:
            async for piece in self._corrector(pair).astream(messages, child, **self._options(kwargs)):
                full = piece if full is None else full + piece
                if piece.text:
                    yield _delta(pair, piece.text)
            assert full is not None
            result: Correction | BaseException = correction_of(full, pair)
        except Exception as exc:
            if _sent(full):
                raise
            result = exc
        out, meta = self._settle(pair, result)
        await adispatch_custom_event(EVENT, meta, config=child)
        for chunk in _tail(pair, out) if _sent(full) else [_whole(out)]:
            yield chunk
