"""``AlignerRunnable``: an LCEL stage that corrects a chain's answer, and ``with_aligner`` to wrap a chain."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

from langchain_core.callbacks import (
    AsyncCallbackManagerForChainRun,
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForChainRun,
    CallbackManagerForLLMRun,
)
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from langchain_core.runnables.utils import ConfigurableFieldSpec
from langchain_core.utils.pydantic import create_model_v2
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from aligner_core import (
    Aligner,
    Correction,
    CorrectionTimeoutError,
    EngineUnavailableError,
    GenerationOptionError,
    UnsafeStreamError,
)
from aligner_core.decision import Structure
from aligner_core.inspector import Inspector, as_inspector, check_threshold

from . import _trace
from ._io import (
    Job,
    failure,
    output,
    passthrough,
    resolve,
    skipped,
)
from ._quiet import streams_to_users
from ._streaming import EVENT, RUN_TYPE, StreamingStage

OnError = Literal["raise", "passthrough"]
#: Failures worth another try: nothing is wrong with the request itself.
TRANSIENT = (CorrectionTimeoutError, EngineUnavailableError)


def backoff(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): 0.25, 0.5, 1, ... capped at 4."""
    return min(0.25 * 2 ** (attempt - 1), 4.0)


class AlignerRunnable(StreamingStage, RunnableSerializable[Any, Any]):
    """Corrects a chain's answer with an Aligner; the output has the answer's type (``str``, ``AIMessage`` or a
    structured result).

    Input: the answer itself, or a dict with the question under ``question_key``, the answer under
    ``answer_key`` and, optionally, the conversation's earlier messages under ``history_key``
    (``BaseMessage`` objects or role/content dicts; ``chat_history`` is read too) and what the answer was
    grounded on under ``context_key`` (retrieved ``Document``s, strings or context items). Without a question
    in the input, the question comes from ``config["configurable"][question_key]``, else from ``question``;
    the history likewise from ``config["configurable"][history_key]``. Each correction is also a chat-model run
    named ``Aligner`` (the Aligner's tokens, streamed text and usage), nested in this stage's chain run.

    What is corrected is the core's decision (docs/what-gets-corrected.md): an answer that calls tools, a
    refusal, structured output, an empty answer or an intermediate step passes through with ``skipped`` in its
    details. A bare stage after a model (``prompt | llm | AlignerRunnable()``) cannot keep that model's tokens
    off ``astream_events`` or LangGraph's stream modes, so it refuses to run under them
    (``UnsafeStreamError``, saying what to write instead) unless ``stream_uncorrected=True``.
    """

    aligner: Aligner
    """The corrector (``aligner_core.Aligner``)."""
    question: str | None = None
    """A fixed question, for chains whose answer arrives without it."""
    question_key: str = "question"
    """Where the question is in a dict input, and its key in ``config["configurable"]``."""
    answer_key: str = "answer"
    """Where the answer is in a dict input."""
    history_key: str = "history"
    """Where the conversation's earlier messages are in a dict input (``chat_history`` is read too), and their
    key in ``config["configurable"]``."""
    on_error: OnError = "raise"
    """``"passthrough"`` returns the original answer when the corrector fails (error in metadata and log)."""
    generation_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Generation options for every correction (``max_new_tokens``, ``stop``, ...); call kwargs add to them."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds one correction may take in ``invoke``/``ainvoke``/``abatch``; past it the request is cancelled
    (``CorrectionTimeoutError``). Streams and the planned ``batch`` pass are bounded by their tokens only."""
    max_retries: int = Field(default=0, ge=0)
    """Retries of a correction that failed transiently (a timeout, an engine that cannot serve)."""
    inspector: Inspector | Callable[[str, str], float] | None = None
    """Scores ``(question, answer)`` in [0, 1] (1: aligned) before correcting: an answer scoring at or above
    ``threshold`` comes back unchanged and costs no generation (``aligner_core.inspector.Inspector`` or a callable).
    None: the Aligner's own inspector, if it was built with one."""
    threshold: float | None = None
    """The inspector's pass mark; None: the Aligner's (0.5 unless it was built with another)."""
    context_key: str = "context"
    """Where a dict input holds what the answer was grounded on (documents, strings or context items)."""
    structure: Structure | None = None
    """The structure the answer must keep (``aligner_core.Structure``), for answers that are JSON by request;
    structured results (pydantic objects) carry their own."""
    correct_structured: bool = False
    """Correct structured output too, keeping a correction only when it still parses and validates."""
    stream_uncorrected: bool = False
    """Run even under a stream a user sees (``astream_events``, LangGraph stream modes) although what runs before
    this stage in a chain may stream uncorrected tokens there."""
    include_original: bool = False
    """Record the uncorrected answer as ``original`` in the details (``response_metadata["aligner"]`` and the
    ``aligner_correction`` event). Off by default: a corrected message flows on to users (LangGraph state and
    stream modes carry it whole), and the answer it replaced must not travel with it."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")
    #: Set by ``with_aligner`` and ``AlignedChatModel``, which keep their upstream off user streams themselves.
    _guarded: bool = PrivateAttr(default=False)

    @field_validator("inspector")
    @classmethod
    def _check_inspector(cls, value: Any) -> Any:
        return None if value is None else as_inspector(value)

    @field_validator("threshold")
    @classmethod
    def _check_threshold(cls, value: Any) -> float | None:
        return None if value is None else check_threshold(value)

    # -- what it accepts and returns -------------------------------------------------------------

    @property
    def InputType(self) -> Any:  # noqa: N802 - LangChain's name
        return Union[str, AIMessage, dict]  # noqa: UP007

    @property
    def OutputType(self) -> Any:  # noqa: N802 - LangChain's name
        return Union[str, AIMessage]  # noqa: UP007

    def get_input_schema(self, config: RunnableConfig | None = None) -> type[BaseModel]:
        """The answer (``str`` or ``AIMessage``), or a dict with it under ``answer_key`` and the question."""
        pair = create_model_v2(
            "AlignerRunnablePair",
            field_definitions={
                self.answer_key: (Union[str, AIMessage], ...),  # noqa: UP007
                self.question_key: (Union[str, None], None),  # noqa: UP007
                self.history_key: (Union[list[Union[BaseMessage, dict[str, Any]]], None], None),  # noqa: UP007
            },
        )
        return create_model_v2("AlignerRunnableInput", root=Union[str, AIMessage, pair])  # type: ignore[valid-type] # noqa: UP007

    def get_output_schema(self, config: RunnableConfig | None = None) -> type[BaseModel]:
        """The corrected answer, of the answer's type."""
        return create_model_v2("AlignerRunnableOutput", root=Union[str, AIMessage])  # noqa: UP007

    @property
    def config_specs(self) -> list[ConfigurableFieldSpec]:
        """The question and the history may come from ``config["configurable"]``."""
        return [
            ConfigurableFieldSpec(
                id=self.question_key,
                annotation=Union[str, None],  # noqa: UP007
                name="Question",
                description="The question the answer replies to, when the input does not hold it.",
                default=None,
                is_shared=True,
            ),
            ConfigurableFieldSpec(
                id=self.history_key,
                annotation=Union[list[Union[BaseMessage, dict[str, Any]]], None],  # noqa: UP007
                name="History",
                description="The conversation's messages before the question, when the input does not hold them.",
                default=None,
                is_shared=True,
            ),
        ]

    # -- helpers -------------------------------------------------------------------------------

    def _job(self, value: Any, config: RunnableConfig) -> Job:
        return resolve(
            value,
            question_key=self.question_key,
            answer_key=self.answer_key,
            question=self.question,
            configurable=config.get("configurable"),
            history_key=self.history_key,
            context_key=self.context_key,
            structure=self.structure,
            correct_structured=self.correct_structured,
        )

    def _refuse_unsafe_streams(self, run_manager: Any) -> None:
        """A stage inside a chain, under a stream a user sees, cannot hide what ran before it: refuse.

        ``run_manager`` is this stage's run manager, or the callback manager of the config a sequence hands to
        ``transform`` (checked there, before the sequence pulls the first chunk of the step before this one).
        """
        if self.stream_uncorrected or self._guarded or getattr(run_manager, "parent_run_id", None) is None:
            return
        if streams_to_users(run_manager.handlers):
            raise UnsafeStreamError(
                "AlignerRunnable runs inside a chain streamed to users (astream_events, astream_log or a LangGraph "
                "stream mode): a model before it in the chain streams its uncorrected tokens there before the "
                "answer reaches this stage. Write with_aligner(prompt | llm, aligner=aligner) or "
                "prompt | AlignedChatModel(llm=llm, aligner=aligner) instead (both keep the upstream off every user "
                "stream), or pass AlignerRunnable(..., stream_uncorrected=True) if nothing before this stage "
                "streams uncorrected text."
            )

    def _passed(self, job: Job) -> Correction:
        """The Correction of an answer the core passes through."""
        return skipped(job, {"template": self.aligner.template.name, "engine": self.aligner.engine.name})

    def _options(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.generation_kwargs, **kwargs}

    @property
    def _gate(self) -> dict[str, Any]:
        """The inspector keywords for the core: only those set, so an Aligner's own inspector still applies."""
        gate = {"inspector": self.inspector, "threshold": self.threshold}
        return {k: v for k, v in gate.items() if v is not None}

    def _settle(self, job: Job, result: Correction | BaseException) -> tuple[Any, dict[str, Any]]:
        """The output for a correction or an error (raised unless passing through), and its details."""
        name = self.aligner.name
        if isinstance(result, BaseException):
            if self.on_error == "raise" or isinstance(result, GenerationOptionError):
                raise result
            return passthrough(job, result, name), failure(job, result, name)
        return output(job, result, name, include_original=self.include_original)

    def _correct(self, job: Job, options: Mapping[str, Any]) -> Correction:
        for attempt in range(self.max_retries + 1):
            try:
                return self.aligner.correct(
                    job.question, job.text, history=job.turns, context=job.grounding, timeout=self.timeout,
                    **self._gate, **options,
                )
            except TRANSIENT:
                if attempt == self.max_retries:
                    raise
            time.sleep(backoff(attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _acorrect(self, job: Job, options: Mapping[str, Any]) -> Correction:
        for attempt in range(self.max_retries + 1):
            try:
                return await self.aligner.acorrect(
                    job.question, job.text, history=job.turns, context=job.grounding, timeout=self.timeout,
                    **self._gate, **options,
                )
            except TRANSIENT:
                if attempt == self.max_retries:
                    raise
            await asyncio.sleep(backoff(attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def _end(self, run: CallbackManagerForLLMRun, result: Correction | BaseException, job: Job) -> None:
        if isinstance(result, BaseException):
            run.on_llm_error(result)
        else:
            run.on_llm_end(_trace.result(result, self.aligner, _trace.message_id(job, run)))

    async def _aend(self, run: AsyncCallbackManagerForLLMRun, result: Correction | BaseException, job: Job) -> None:
        if isinstance(result, BaseException):
            await run.on_llm_error(result)
        else:
            await run.on_llm_end(_trace.result(result, self.aligner, _trace.message_id(job, run)))

    # -- invoke and batch ----------------------------------------------------------------------

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Correct one answer. ``kwargs`` are generation options for this call."""
        return self._call_with_config(self._invoke, input, config, run_type=RUN_TYPE, **kwargs)

    def _invoke(self, value: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig, **kwargs: Any) -> Any:
        self._refuse_unsafe_streams(run_manager)
        return self._whole_output(self._job(value, config), run_manager, kwargs)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Async ``invoke``: concurrent calls share the Aligner's batches."""
        return await self._acall_with_config(self._ainvoke, input, config, run_type=RUN_TYPE, **kwargs)

    async def _ainvoke(
        self, value: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig, **kwargs: Any
    ) -> Any:
        self._refuse_unsafe_streams(run_manager)
        return await self._awhole_output(self._job(value, config), run_manager, kwargs)

    def batch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """Correct many answers in planned ``correct_batch`` passes (input order kept); one run per input.

        ``config["max_concurrency"]`` bounds how many corrections one pass holds.
        """
        return self._batch_with_config(
            self._batch, inputs, config, return_exceptions=return_exceptions, run_type=RUN_TYPE,
            fail_fast=not return_exceptions, **kwargs,
        )

    async def abatch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """Async ``batch``: concurrent ``acorrect`` calls sharing the engine's batches, at most
        ``config["max_concurrency"]`` at a time."""
        return await self._abatch_with_config(
            self._abatch, inputs, config, return_exceptions=return_exceptions, run_type=RUN_TYPE,
            fail_fast=not return_exceptions, **kwargs,
        )

    def _jobs(self, values: list[Any], configs: list[RunnableConfig], fail_fast: bool) -> list[Job | Exception]:
        jobs: list[Job | Exception] = []
        for value, config in zip(values, configs):
            try:
                jobs.append(self._job(value, config))
            except Exception as exc:
                if fail_fast:
                    raise
                jobs.append(exc)
        return jobs

    def _finish(
        self, jobs: list[Job | Exception], live: list[int], results: list[Any]
    ) -> tuple[list[Any], list[tuple[int, dict[str, Any]]]]:
        """Outputs in input order (exceptions in place) and the details to report per input index; answers the
        core passes through are settled here too."""
        outs: list[Any] = [j if isinstance(j, Exception) else j.answer for j in jobs]
        metas: list[tuple[int, dict[str, Any]]] = []
        passed = [(i, self._passed(j)) for i, j in enumerate(jobs) if isinstance(j, Job) and j.skip]
        for i, result in [*zip(live, results), *passed]:
            job = jobs[i]
            assert isinstance(job, Job)
            try:
                outs[i], meta = self._settle(job, result)
            except Exception as exc:
                outs[i] = exc
            else:
                metas.append((i, meta))
        return outs, metas

    @staticmethod
    def _limit(configs: Sequence[RunnableConfig], n: int) -> int:
        limit = configs[0].get("max_concurrency") if configs else None
        return max(1, int(limit)) if limit else max(n, 1)

    def _batch(
        self,
        values: list[Any],
        run_manager: list[CallbackManagerForChainRun],
        config: list[RunnableConfig],
        *,
        fail_fast: bool,
        **kwargs: Any,
    ) -> list[Any]:
        for manager in run_manager:
            self._refuse_unsafe_streams(manager)
        jobs = self._jobs(values, config, fail_fast)
        live = [i for i, j in enumerate(jobs) if isinstance(j, Job) and not j.skip]
        options = self._options(kwargs)
        runs = {i: _trace.start(run_manager[i].get_child(), self.aligner, jobs[i], options) for i in live}  # type: ignore[arg-type]
        results: list[Any] = []
        step = self._limit(config, len(live))
        for k in range(0, len(live), step):
            pairs = [jobs[i].pair() for i in live[k : k + step]]  # type: ignore[union-attr]
            try:
                results += self.aligner.correct_batch(pairs, return_exceptions=True, **self._gate, **options)
            except Exception as exc:  # a bad option: every correction of this pass fails with it
                results += [exc] * len(pairs)
        for i, result in zip(live, results):
            self._end(runs[i], result, jobs[i])  # type: ignore[arg-type]
        outs, metas = self._finish(jobs, live, results)
        for i, meta in metas:
            run_manager[i].get_child().on_custom_event(EVENT, meta, run_id=run_manager[i].run_id)
        return outs

    async def _abatch(
        self,
        values: list[Any],
        run_manager: list[AsyncCallbackManagerForChainRun],
        config: list[RunnableConfig],
        *,
        fail_fast: bool,
        **kwargs: Any,
    ) -> list[Any]:
        for manager in run_manager:
            self._refuse_unsafe_streams(manager)
        jobs = self._jobs(values, config, fail_fast)
        live = [i for i, j in enumerate(jobs) if isinstance(j, Job) and not j.skip]
        options = self._options(kwargs)
        gate = asyncio.Semaphore(self._limit(config, len(live)))

        async def one(i: int) -> Correction | BaseException:
            job = jobs[i]
            assert isinstance(job, Job)
            async with gate:
                run = await _trace.astart(run_manager[i].get_child(), self.aligner, job, options)
                try:
                    result: Correction | BaseException = await self._acorrect(job, options)
                except Exception as exc:
                    result = exc
                await self._aend(run, result, job)
                return result

        results = list(await asyncio.gather(*(one(i) for i in live)))
        outs, metas = self._finish(jobs, live, results)
        for i, meta in metas:
            await run_manager[i].get_child().on_custom_event(EVENT, meta, run_id=run_manager[i].run_id)
        return outs
