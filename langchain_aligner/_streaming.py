"""Streaming for ``AlignerRunnable``: gather the streamed answer, then stream its correction as deltas.

A ``str`` answer streams ``str`` deltas; a message answer streams ``AIMessageChunk`` deltas and one
last chunk carrying the tool calls, usage and ``response_metadata["aligner"]``, so the chunks add
up to what ``invoke`` returns.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForChainRun,
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForChainRun,
    CallbackManagerForLLMRun,
)
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.runnables import RunnableConfig

from aligner_core import Correction

from . import _trace
from ._io import Job, to_chunk
from ._io import merge as merge_chunk
from ._quiet import streams_to_users

if TYPE_CHECKING:
    from collections.abc import Mapping

    from aligner_core import Aligner

#: Each call is a "chain" run: an "llm" run would make tracers count the upstream's usage_metadata
#: (kept on the corrected AIMessage) a second time; the Aligner's own tokens are in the details.
RUN_TYPE = "chain"
#: Name of the custom callback event that carries each correction's details (or its error).
EVENT = "aligner_correction"


class StreamingStage:
    """``stream``/``transform`` and their async twins for ``AlignerRunnable`` (a mixin)."""

    if TYPE_CHECKING:
        aligner: Aligner

        def _job(self, value: Any, config: RunnableConfig) -> Job: ...
        def _options(self, kwargs: Mapping[str, Any]) -> dict[str, Any]: ...
        @property
        def _gate(self) -> dict[str, Any]: ...
        def _settle(self, job: Job, result: Correction | BaseException) -> tuple[Any, dict[str, Any]]: ...
        def _end(self, run: CallbackManagerForLLMRun, result: Correction | BaseException, job: Job) -> None: ...
        async def _aend(self, run: AsyncCallbackManagerForLLMRun, result: Correction | BaseException, job: Job) -> None: ...
        def _refuse_unsafe_streams(self, run_manager: Any) -> None: ...
        def _passed(self, job: Job) -> Correction: ...
        def _correct(self, job: Job, options: Mapping[str, Any]) -> Correction: ...
        async def _acorrect(self, job: Job, options: Mapping[str, Any]) -> Correction: ...
        def _transform_stream_with_config(self, *args: Any, **kwargs: Any) -> Iterator[Any]: ...
        def _atransform_stream_with_config(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]: ...

    @staticmethod
    def _delta(job: Job, text: str) -> str | AIMessageChunk:
        return text if isinstance(job.answer, str) else AIMessageChunk(content=text, id=job.answer.id)

    @staticmethod
    def _whole(result: Any) -> Any:
        """A whole output as one (last) chunk: passthroughs and untouched answers (a structured result as it is)."""
        if not isinstance(result, AIMessage):
            return result
        return AIMessageChunk(**{**to_chunk(result).model_dump(exclude={"type"}), "chunk_position": "last"})

    @staticmethod
    def _tail(job: Job, out: Any) -> Iterator[str | AIMessageChunk]:
        """After the deltas, a message answer gets one last chunk with tool calls, usage and metadata."""
        if isinstance(job.answer, AIMessage):
            whole = to_chunk(out)
            rest = [b for b in whole.content if isinstance(b, dict) and b.get("type") != "text"]
            yield AIMessageChunk(
                content=rest or "",
                id=job.answer.id,
                additional_kwargs=whole.additional_kwargs,
                response_metadata=whole.response_metadata,
                usage_metadata=whole.usage_metadata,
                tool_call_chunks=whole.tool_call_chunks,
                chunk_position="last",
            )

    def _whole_output(self, job: Job, run_manager: CallbackManagerForChainRun, kwargs: dict[str, Any]) -> Any:
        """The output of an answer that does not stream: passed through, or structured (settled whole)."""
        if job.skip:
            result: Correction | BaseException = self._passed(job)
        else:
            options = self._options(kwargs)
            run = _trace.start(run_manager.get_child(), self.aligner, job, options)
            try:
                if streams_to_users(run_manager.handlers) and job.decision.structure is None:
                    result = self._correct_streaming(job, run, options)  # tokens reach the user's stream
                else:
                    result = self._correct(job, options)
            except Exception as exc:
                result = exc
            self._end(run, result, job)
        out, meta = self._settle(job, result)
        run_manager.get_child().on_custom_event(EVENT, meta, run_id=run_manager.run_id)
        return out

    async def _awhole_output(
        self, job: Job, run_manager: AsyncCallbackManagerForChainRun, kwargs: dict[str, Any]
    ) -> Any:
        """Async :meth:`_whole_output`."""
        if job.skip:
            result: Correction | BaseException = self._passed(job)
        else:
            options = self._options(kwargs)
            run = await _trace.astart(run_manager.get_child(), self.aligner, job, options)
            try:
                if streams_to_users(run_manager.handlers) and job.decision.structure is None:
                    result = await self._acorrect_streaming(job, run, options)  # tokens reach the user's stream
                else:
                    result = await self._acorrect(job, options)
            except Exception as exc:
                result = exc
            await self._aend(run, result, job)
        out, meta = self._settle(job, result)
        await run_manager.get_child().on_custom_event(EVENT, meta, run_id=run_manager.run_id)
        return out

    def _correct_streaming(self, job: Job, run: CallbackManagerForLLMRun, options: dict[str, Any]) -> Correction:
        """Correct through the Aligner's stream, each delta a token of the ``Aligner`` run: what LangChain chat
        models do inside ``invoke`` when a stream (``astream_events``, LangGraph's "messages") listens."""
        stream = self.aligner.stream(job.question, job.text, history=job.turns, context=job.grounding,
                                     **self._gate, **options)
        message_id = _trace.message_id(job, run)
        try:
            for delta in stream:
                run.on_llm_new_token(delta, chunk=_trace.chunk(delta, message_id))
        finally:
            stream.close()
        assert stream.correction is not None  # a stream that ends cleanly holds its correction
        return stream.correction

    async def _acorrect_streaming(
        self, job: Job, run: AsyncCallbackManagerForLLMRun, options: dict[str, Any]
    ) -> Correction:
        """Async :meth:`_correct_streaming`."""
        stream = self.aligner.astream(job.question, job.text, history=job.turns, context=job.grounding,
                                      **self._gate, **options)
        message_id = _trace.message_id(job, run)
        try:
            async for delta in stream:
                await run.on_llm_new_token(delta, chunk=_trace.chunk(delta, message_id))
        finally:
            await stream.aclose()
        assert stream.correction is not None
        return stream.correction

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        """Stream the correction: ``str`` deltas, or ``AIMessageChunk`` deltas for a message answer."""
        yield from self.transform(iter([input]), config, **kwargs)

    def transform(self, input: Iterator[Any], config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        """In a streaming sequence: gather the streamed answer, then stream its correction."""
        self._refuse_unsafe_streams((config or {}).get("callbacks"))  # before the step before this one starts
        yield from self._transform_stream_with_config(input, self._transform, config, run_type=RUN_TYPE, **kwargs)

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
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
        async for chunk in self._atransform_stream_with_config(input, self._atransform, config, run_type=RUN_TYPE, **kwargs):
            yield chunk

    def _transform(
        self, chunks: Iterator[Any], run_manager: CallbackManagerForChainRun, config: RunnableConfig, **kwargs: Any
    ) -> Iterator[Any]:
        value = None
        for chunk in chunks:
            value = merge_chunk(value, chunk)
        job = self._job(value, config)
        if job.skip or job.decision.structure is not None:  # structure is kept or rejected whole: no deltas
            yield self._whole(self._whole_output(job, run_manager, kwargs))
            return
        emitted = False
        options = self._options(kwargs)
        run = _trace.start(run_manager.get_child(), self.aligner, job, options)
        message_id = _trace.message_id(job, run)
        try:
            stream = self.aligner.stream(job.question, job.text, history=job.turns, context=job.grounding,
                                         **self._gate, **options)
        except Exception as exc:
            result: Correction | BaseException | None = exc
        else:
            try:
                for delta in stream:
                    emitted = True
                    run.on_llm_new_token(delta, chunk=_trace.chunk(delta, message_id))
                    yield self._delta(job, delta)
                result = stream.correction
            except BaseException as exc:
                run.on_llm_error(exc)
                if emitted or not isinstance(exc, Exception):  # deltas already went out: no passthrough
                    raise
                result = exc
                run = None  # type: ignore[assignment]
            finally:
                stream.close()
        if run is not None:
            self._end(run, result, job)  # type: ignore[arg-type]
        out, meta = self._settle(job, result)  # type: ignore[arg-type]
        run_manager.get_child().on_custom_event(EVENT, meta, run_id=run_manager.run_id)
        yield from self._tail(job, out) if emitted else [self._whole(out)]

    async def _atransform(
        self,
        chunks: AsyncIterator[Any],
        run_manager: AsyncCallbackManagerForChainRun,
        config: RunnableConfig,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        value = None
        async for chunk in chunks:
            value = merge_chunk(value, chunk)
        job = self._job(value, config)
        if job.skip or job.decision.structure is not None:  # structure is kept or rejected whole: no deltas
            yield self._whole(await self._awhole_output(job, run_manager, kwargs))
            return
        emitted = False
        options = self._options(kwargs)
        run = await _trace.astart(run_manager.get_child(), self.aligner, job, options)
        message_id = _trace.message_id(job, run)
        try:
            stream = self.aligner.astream(job.question, job.text, history=job.turns, context=job.grounding,
                                          **self._gate, **options)
        except Exception as exc:
            result: Correction | BaseException | None = exc
        else:
            try:
                async for delta in stream:
                    emitted = True
                    await run.on_llm_new_token(delta, chunk=_trace.chunk(delta, message_id))
                    yield self._delta(job, delta)
                result = stream.correction
            except BaseException as exc:
                await run.on_llm_error(exc)
                if emitted or not isinstance(exc, Exception):
                    raise
                result = exc
                run = None  # type: ignore[assignment]
            finally:
                await stream.aclose()
        if run is not None:
            await self._aend(run, result, job)  # type: ignore[arg-type]
        out, meta = self._settle(job, result)  # type: ignore[arg-type]
        await run_manager.get_child().on_custom_event(EVENT, meta, run_id=run_manager.run_id)
        for chunk in self._tail(job, out) if emitted else [self._whole(out)]:
            yield chunk
