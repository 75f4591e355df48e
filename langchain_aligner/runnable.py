"""``AlignerRunnable``: an LCEL stage that corrects a chain's answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

from langchain_core.callbacks import (
    AsyncCallbackManagerForChainRun,
    CallbackManagerForChainRun,
    adispatch_custom_event,
    dispatch_custom_event,
)
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from langchain_core.runnables.config import patch_config
from langchain_core.runnables.retry import RunnableRetry
from langchain_core.runnables.utils import ConfigurableFieldSpec, gather_with_concurrency
from langchain_core.utils.pydantic import create_model_v2
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from aligner_core import (
    Aligner,
    Correction,
    CorrectionTimeoutError,
    EngineUnavailableError,
    UnsafeStreamError,
)
from aligner_core.decision import Structure
from aligner_core.inspector import Inspector, as_inspector, check_threshold
from aligner_core.reporting import OnError, check_on_error, raises

from ._aligner_chat import RUN_NAME, AlignerChatModel, conversation, correction_of
from ._inputs import Pair, resolve
from ._outputs import output, passthrough
from ._quiet import streams_to_users
from ._streaming import EVENT, RUN_TYPE, StreamingStage

#: Failures worth another try: nothing is wrong with the request itself.
TRANSIENT = (CorrectionTimeoutError, EngineUnavailableError)


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
    """Retries of a correction that failed transiently (a timeout, an engine that cannot serve), through
    LangChain's ``with_retry`` (its exponential backoff with jitter)."""
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

    @field_validator("on_error", mode="before")
    @classmethod
    def _check_on_error(cls, value: Any) -> OnError:
        return check_on_error(value)

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
                annotation=Union[str, None],  # noqa: UP007 -- a runtime value; pydantic reads it
                name="Question",
                description="The question the answer replies to, when the input does not hold it.",
                default=None,
                is_shared=True,
            ),
            ConfigurableFieldSpec(
                id=self.history_key,
                annotation=Union[list[Union[BaseMessage, dict[str, Any]]], None],  # noqa: UP007
                name="History",
                description="The conversation's messages before the question, when the input does "
                "not hold them.",
                default=None,
                is_shared=True,
            ),
        ]

    # -- the pieces every call shares ------------------------------------------------------------

    def _pair(self, value: Any, config: RunnableConfig) -> Pair:
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

    def _refuse_unsafe_streams(self, callbacks: Any) -> None:
        """A stage inside a chain, under a stream a user sees, cannot hide what ran before it: refuse.

        ``callbacks`` is this stage's run manager, or the callback manager of the config a sequence hands to
        ``transform`` (checked there, before the sequence pulls the first chunk of the step before this one).
        """
        if self.stream_uncorrected or self._guarded or getattr(callbacks, "parent_run_id", None) is None:
            return
        if streams_to_users(callbacks.handlers):
            raise UnsafeStreamError(
                "AlignerRunnable runs inside a chain streamed to users (astream_events, astream_log or a LangGraph "
                "stream mode): a model before it in the chain streams its uncorrected tokens there before the "
                "answer reaches this stage. Write with_aligner(prompt | llm, aligner=aligner) or "
                "prompt | AlignedChatModel(llm=llm, aligner=aligner) instead (both keep the upstream off every user "
                "stream), or pass AlignerRunnable(..., stream_uncorrected=True) if nothing before this stage "
                "streams uncorrected text."
            )

    def _corrector(self, pair: Pair | None = None) -> Runnable[Any, Any]:
        """The internal ``Aligner`` chat model, behind LangChain's ``RunnableRetry`` when ``max_retries``. A
        structured answer's correction never streams (it is kept or rejected whole): ``disable_streaming`` says so."""
        gate = {
            k: v for k, v in (("inspector", self.inspector), ("threshold", self.threshold)) if v is not None
        }
        model = AlignerChatModel(
            aligner=self.aligner,
            timeout=self.timeout,
            gate=gate,
            disable_streaming=pair is not None and not pair.streams,
        )
        named = model.with_config(run_name=RUN_NAME)  # handlers get the run's name, not only tracers
        if not self.max_retries:
            return named
        # what ``with_retry`` builds, but around the named model (``with_retry`` on a binding unwraps it, and the
        # attempts would lose the name); LangChain names the retry's chain run after the model too
        return RunnableRetry(
            bound=named, retry_exception_types=TRANSIENT, max_attempt_number=self.max_retries + 1
        )

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**self.generation_kwargs, **kwargs}

    def _passed(self, pair: Pair) -> Correction:
        """The Correction of an answer the core passes through."""
        return pair.decision.passthrough(
            pair.question, {"template": self.aligner.template.name, "engine": self.aligner.engine.name}
        )

    def _settle(self, pair: Pair, result: Correction | BaseException) -> tuple[Any, dict[str, Any]]:
        """The output for a correction or an error (raised unless passing through), and its details."""
        if isinstance(result, BaseException):
            if raises(self.on_error, result):
                raise result
            return passthrough(pair, result, self.aligner.name)
        return output(pair, result, self.aligner.name, include_original=self.include_original)

    @staticmethod
    def _child(
        run_manager: CallbackManagerForChainRun | AsyncCallbackManagerForChainRun, config: RunnableConfig
    ) -> RunnableConfig:
        return patch_config(config, callbacks=run_manager.get_child())

    def _correct(self, pair: Pair, child: RunnableConfig, kwargs: dict[str, Any]) -> Any:
        """The output of one answer, corrected through the ``Aligner`` run (which streams when a stream listens)
        or passed through; its details go out as the ``aligner_correction`` event."""
        result: Correction | BaseException
        if pair.skip:
            result = self._passed(pair)
        else:
            messages = conversation(pair)  # a malformed context item is a wiring mistake: it raises
            try:
                message = self._corrector(pair).invoke(messages, child, **self._options(kwargs))
                result = correction_of(message, pair)
            except Exception as exc:
                result = exc
        out, meta = self._settle(pair, result)
        dispatch_custom_event(EVENT, meta, config=child)
        return out

    async def _acorrect(self, pair: Pair, child: RunnableConfig, kwargs: dict[str, Any]) -> Any:
        """Async :meth:`_correct`."""
        result: Correction | BaseException
        if pair.skip:
            result = self._passed(pair)
        else:
            messages = conversation(pair)  # a malformed context item is a wiring mistake: it raises
            try:
                message = await self._corrector(pair).ainvoke(messages, child, **self._options(kwargs))
                result = correction_of(message, pair)
            except Exception as exc:
                result = exc
        out, meta = self._settle(pair, result)
        await adispatch_custom_event(EVENT, meta, config=child)
        return out

    # -- invoke and batch ----------------------------------------------------------------------

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Correct one answer. ``kwargs`` are generation options for this call."""
        return self._call_with_config(self._invoke, input, config, run_type=RUN_TYPE, **kwargs)

    def _invoke(
        self, value: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig, **kwargs: Any
    ) -> Any:
        self._refuse_unsafe_streams(run_manager)
        return self._correct(self._pair(value, config), self._child(run_manager, config), kwargs)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Async ``invoke``: concurrent calls share the Aligner's batches."""
        return await self._acall_with_config(self._ainvoke, input, config, run_type=RUN_TYPE, **kwargs)

    async def _ainvoke(
        self, value: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig, **kwargs: Any
    ) -> Any:
        self._refuse_unsafe_streams(run_manager)
        return await self._acorrect(self._pair(value, config), self._child(run_manager, config), kwargs)

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
            self._batch,
            inputs,
            config,
            return_exceptions=return_exceptions,
            run_type=RUN_TYPE,
            fail_fast=not return_exceptions,
            **kwargs,
        )

    async def abatch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """Async ``batch``: concurrent corrections sharing the engine's batches, at most
        ``config["max_concurrency"]`` at a time."""
        return await self._abatch_with_config(
            self._abatch,
            inputs,
            config,
            return_exceptions=return_exceptions,
            run_type=RUN_TYPE,
            fail_fast=not return_exceptions,
            **kwargs,
        )

    def _pairs(
        self, values: list[Any], configs: list[RunnableConfig], fail_fast: bool
    ) -> list[Pair | Exception]:
        pairs: list[Pair | Exception] = []
        for value, config in zip(values, configs):
            try:
                pairs.append(self._pair(value, config))
            except Exception as exc:
                if fail_fast:
                    raise
                pairs.append(exc)
        return pairs

    def _settled(self, pair: Pair | Exception, result: Any) -> tuple[Any, dict[str, Any] | None]:
        """One batch item's output (its exception in place when it failed) and its details."""
        if isinstance(pair, Exception):
            return pair, None
        try:
            if pair.skip:
                return self._settle(pair, self._passed(pair))
            return self._settle(
                pair, result if isinstance(result, Exception) else correction_of(result, pair)
            )
        except Exception as exc:
            return exc, None

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
        pairs = self._pairs(values, config, fail_fast)
        live = [i for i, p in enumerate(pairs) if isinstance(p, Pair) and not p.skip]
        children = [self._child(m, c) for m, c in zip(run_manager, config)]
        messages = [conversation(pairs[i]) for i in live]  # type: ignore[arg-type]
        results = dict(
            zip(
                live,
                self._corrector().batch(
                    messages, [children[i] for i in live], return_exceptions=True, **self._options(kwargs)
                )
                if live
                else [],
            )
        )
        outs = []
        for i, pair in enumerate(pairs):
            out, meta = self._settled(pair, results.get(i))
            if meta is not None:
                dispatch_custom_event(EVENT, meta, config=children[i])
            outs.append(out)
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
        pairs = self._pairs(values, config, fail_fast)
        children = [self._child(m, c) for m, c in zip(run_manager, config)]

        async def one(pair: Pair | Exception, child: RunnableConfig) -> Any:
            """One item's output, or its exception in place."""
            if isinstance(pair, Exception):
                return pair
            try:
                return await self._acorrect(pair, child, kwargs)
            except Exception as exc:
                return exc

        limit = config[0].get("max_concurrency") if config else None
        return list(await gather_with_concurrency(limit, *(one(p, c) for p, c in zip(pairs, children))))
