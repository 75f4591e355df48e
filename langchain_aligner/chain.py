"""``with_aligner``: wrap any chain so that its answer is corrected, and only the correction streams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForChainRun, CallbackManagerForChainRun
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from langchain_core.runnables.config import patch_config
from langchain_core.runnables.utils import ConfigurableFieldSpec
from pydantic import BaseModel, ConfigDict

from aligner_core import Aligner
from aligner_core.inspector import Inspector
from aligner_core.reporting import OnError

from ._grounding import GroundingCollector
from ._inputs import MissingQuestionError, context_value, history_value, merge, split_question
from ._quiet import UNCORRECTED_TAG, ainvoke_in, child_config, invoke_in
from ._streaming import RUN_TYPE
from .runnable import AlignerRunnable


@dataclass
class _Call:
    """One input's pieces: the question, history and given context, the wrapped chain's (hidden) config with the
    collector of what its retrievers and tools return, and the stage's config."""

    request: dict[str, Any]
    upstream: RunnableConfig
    collector: GroundingCollector
    downstream: RunnableConfig

    def stage_input(self, stage: AlignerRunnable, answer: Any) -> dict[str, Any]:
        """The stage's input: the request, the answer, and the grounding given and collected."""
        return {
            stage.question_key: self.request["question"],
            stage.history_key: self.request["history"],
            stage.answer_key: answer,
            stage.context_key: [*self.request["context"], *self.collector.items],
        }


class AlignedChain(RunnableSerializable[Any, Any]):
    """A chain whose answer is corrected: what :func:`with_aligner` returns.

    The wrapped chain runs to completion first, off every stream a user sees (its runs are traced, tagged
    ``aligner:uncorrected`` and ``nostream``, but ``astream_events``, ``astream_log`` and LangGraph's stream modes
    get none of their events, and token callbacks none of their tokens), then the correction streams: as
    ``on_chat_model_stream`` of the nested ``Aligner`` run, and as this runnable's own output chunks.
    ``stream_uncorrected=True`` lets the wrapped chain's events through as well. Input and output schemas are
    the wrapped chain's. The conversation's earlier messages (a dict input's ``history_key``, the key
    ``RunnableWithMessageHistory(history_messages_key=...)`` fills, or the messages before the last human one)
    reach the correction as its history; what the chain's retrievers returned and its tools answered, the input's
    ``context_key`` and the tool turns after the question reach it as its grounding context.
    """

    chain: Runnable[Any, Any]
    """The wrapped chain, whose input holds the question."""
    stage: AlignerRunnable
    """The correction stage."""
    question_key: str = "question"
    """Where the question is in a dict input."""
    history_key: str = "history"
    """Where the conversation's earlier messages are in a dict input (``chat_history`` is read too); a ``str``
    there is a prompt variable and is left alone."""
    context_key: str = "context"
    """Where a dict input holds what the answer is grounded on (documents, strings or context items)."""
    stream_uncorrected: bool = False
    """Also stream the wrapped chain's uncorrected tokens to callbacks and ``astream_events`` (unsafe for UIs)."""
    name: str | None = "with_aligner"

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    @property
    def InputType(self) -> Any:  # noqa: N802 - LangChain's name
        return self.chain.InputType

    @property
    def OutputType(self) -> Any:  # noqa: N802 - LangChain's name
        return self.chain.OutputType

    def get_input_schema(self, config: RunnableConfig | None = None) -> type[BaseModel]:
        return self.chain.get_input_schema(config)

    def get_output_schema(self, config: RunnableConfig | None = None) -> type[BaseModel]:
        return self.chain.get_output_schema(config)

    @property
    def config_specs(self) -> list[ConfigurableFieldSpec]:
        return self.chain.config_specs

    def _request(self, value: Any) -> dict[str, Any]:
        """The stage's input without its answer: the question, the history and the given context."""
        history: tuple[dict[str, str], ...] = ()
        given: tuple[dict[str, str], ...] = ()
        if isinstance(value, Mapping):
            if self.question_key not in value:
                raise MissingQuestionError(
                    f"the chain input has no {self.question_key!r} key (keys: {sorted(map(str, value))})"
                )
            history = history_value(value, self.history_key, strict=False) or ()
            given = context_value(value.get(self.context_key))
            value = value[self.question_key]
        question, earlier, tools = split_question(value)
        return {"question": question, "history": [*history, *earlier], "context": [*tools, *given]}

    def _call(
        self, value: Any, run_manager: Any, config: RunnableConfig, request: dict[str, Any] | None = None
    ) -> _Call:
        """The pieces of one input (see :class:`_Call`); the wrapped chain is hidden unless ``stream_uncorrected``."""
        manager, collector = run_manager.get_child(), GroundingCollector()
        upstream = child_config(config, manager, quiet=not self.stream_uncorrected, tag=UNCORRECTED_TAG)
        manager.add_handler(collector, inherit=True)
        downstream = patch_config(config, callbacks=run_manager.get_child())
        return _Call(request or self._request(value), upstream, collector, downstream)

    # -- invoke and stream -----------------------------------------------------------------------

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Answer with the chain, then correct. ``kwargs`` are generation options of the correction."""
        return self._call_with_config(self._invoke, input, config, run_type=RUN_TYPE, **kwargs)

    def _invoke(
        self, value: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig, **kwargs: Any
    ) -> Any:
        call = self._call(value, run_manager, config)
        answer = invoke_in(self.chain, value, call.upstream)
        return self.stage.invoke(call.stage_input(self.stage, answer), call.downstream, **kwargs)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self._acall_with_config(self._ainvoke, input, config, run_type=RUN_TYPE, **kwargs)

    async def _ainvoke(
        self, value: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig, **kwargs: Any
    ) -> Any:
        call = self._call(value, run_manager, config)
        answer = await ainvoke_in(self.chain, value, call.upstream)
        return await self.stage.ainvoke(call.stage_input(self.stage, answer), call.downstream, **kwargs)

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        """Stream the correction (the chain's own answer never streams, unless ``stream_uncorrected``)."""
        yield from self.transform(iter([input]), config, **kwargs)

    def transform(
        self, input: Iterator[Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        yield from self._transform_stream_with_config(
            input, self._transform, config, run_type=RUN_TYPE, **kwargs
        )

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
        call = self._call(value, run_manager, config)
        answer = invoke_in(self.chain, value, call.upstream)
        yield from self.stage.stream(call.stage_input(self.stage, answer), call.downstream, **kwargs)

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        async def once() -> AsyncIterator[Any]:
            yield input

        async for chunk in self.atransform(once(), config, **kwargs):
            yield chunk

    async def atransform(
        self, input: AsyncIterator[Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        async for chunk in self._atransform_stream_with_config(
            input, self._atransform, config, run_type=RUN_TYPE, **kwargs
        ):
            yield chunk

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
        call = self._call(value, run_manager, config)
        answer = await ainvoke_in(self.chain, value, call.upstream)
        async for out in self.stage.astream(call.stage_input(self.stage, answer), call.downstream, **kwargs):
            yield out

    # -- batch -----------------------------------------------------------------------------------

    def batch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """The chain's ``batch``, then one planned correction pass (``max_concurrency`` bounds both)."""
        return self._batch_with_config(
            self._batch, inputs, config, return_exceptions=return_exceptions, run_type=RUN_TYPE, **kwargs
        )

    async def abatch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        return await self._abatch_with_config(
            self._abatch, inputs, config, return_exceptions=return_exceptions, run_type=RUN_TYPE, **kwargs
        )

    def _calls(
        self, values: list[Any], run_manager: list[Any], config: list[RunnableConfig]
    ) -> list[_Call | Exception]:
        """Each input's pieces, or the exception that its question raised."""
        calls: list[_Call | Exception] = []
        for value, manager, one in zip(values, run_manager, config):
            try:
                request = self._request(value)
            except Exception as exc:
                calls.append(exc)
            else:
                calls.append(self._call(value, manager, one, request))
        return calls

    def _batch(
        self,
        values: list[Any],
        run_manager: list[CallbackManagerForChainRun],
        config: list[RunnableConfig],
        **kwargs: Any,
    ) -> list[Any]:
        outs: list[Any] = self._calls(values, run_manager, config)
        live = [i for i, c in enumerate(outs) if isinstance(c, _Call)]
        if live:
            answers = self.chain.batch(
                [values[i] for i in live], [outs[i].upstream for i in live], return_exceptions=True
            )
            ready = _failed_in_place(outs, live, answers)
            fixed = self.stage.batch(
                [outs[i].stage_input(self.stage, a) for i, a in ready],
                [outs[i].downstream for i, _ in ready],
                return_exceptions=True,
                **kwargs,
            )
            for (i, _), out in zip(ready, fixed):
                outs[i] = out
        return outs

    async def _abatch(
        self,
        values: list[Any],
        run_manager: list[AsyncCallbackManagerForChainRun],
        config: list[RunnableConfig],
        **kwargs: Any,
    ) -> list[Any]:
        outs: list[Any] = self._calls(values, run_manager, config)
        live = [i for i, c in enumerate(outs) if isinstance(c, _Call)]
        if live:
            answers = await self.chain.abatch(
                [values[i] for i in live], [outs[i].upstream for i in live], return_exceptions=True
            )
            ready = _failed_in_place(outs, live, answers)
            fixed = await self.stage.abatch(
                [outs[i].stage_input(self.stage, a) for i, a in ready],
                [outs[i].downstream for i, _ in ready],
                return_exceptions=True,
                **kwargs,
            )
            for (i, _), out in zip(ready, fixed):
                outs[i] = out
        return outs


def _failed_in_place(outs: list[Any], indices: list[int], results: list[Any]) -> list[tuple[int, Any]]:
    """Put the failed ``results`` (exceptions) in their place in ``outs``; the others, with their input index."""
    ready = []
    for i, result in zip(indices, results):
        if isinstance(result, Exception):
            outs[i] = result
        else:
            ready.append((i, result))
    return ready


def with_aligner(
    chain: Runnable[Any, Any],
    *,
    aligner: Aligner,
    question_key: str = "question",
    history_key: str = "history",
    context_key: str = "context",
    on_error: OnError = "raise",
    generation_kwargs: Mapping[str, Any] | None = None,
    timeout: float | None = None,
    max_retries: int = 0,
    stream_uncorrected: bool = False,
    inspector: Inspector | Callable[[str, str], float] | None = None,
    threshold: float | None = None,
    correct_structured: bool = False,
    include_original: bool = False,
) -> AlignedChain:
    """Wrap ``chain`` so that its answer is corrected against the question in the chain's own input.

    The input may be a dict (the question under ``question_key``, as a str or messages), a str, a
    chat prompt value or a message list (the last human message is the question, the messages before
    it the history; a dict's ``history_key`` adds the turns before those). The output has
    the chain's answer type; ``invoke``/``batch``/``stream`` and their async twins all work, and
    streaming yields the correction only (``stream_uncorrected=True`` lets the chain's own tokens
    reach callbacks too). ``timeout``/``max_retries`` bound each correction (see ``AlignerRunnable``).
    With an ``inspector``, an answer scoring at or above ``threshold`` comes back unchanged (no generation).
    What the chain's retrievers and tools returned, and the input's ``context_key``, ground the correction.
    A structured answer (a pydantic object) passes through unless ``correct_structured``. ``include_original``
    records the uncorrected answer in the details (off: the corrected message may flow on to users).
    """
    stage = AlignerRunnable(
        aligner=aligner,
        on_error=on_error,
        generation_kwargs=dict(generation_kwargs or {}),
        timeout=timeout,
        max_retries=max_retries,
        inspector=inspector,
        threshold=threshold,
        correct_structured=correct_structured,
        include_original=include_original,
    )
    stage._guarded = True  # the wrapped chain runs off user streams (AlignedChain._call)
    return AlignedChain(
        chain=chain,
        stage=stage,
        question_key=question_key,
        history_key=history_key,
        context_key=context_key,
        stream_uncorrected=stream_uncorrected,
    )
