"""``AlignerRunnable``: an LCEL stage that corrects a chain's answer, and ``with_aligner`` to wrap a chain."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForChainRun,
    CallbackManagerForChainRun,
)
from langchain_core.runnables import (
    Runnable,
    RunnableConfig,
    RunnableLambda,
    RunnableParallel,
    RunnableSerializable,
)
from pydantic import ConfigDict, Field

from aligner_core import Aligner, Correction, GenerationOptionError

from ._io import (
    Job,
    MissingQuestionError,
    failure,
    output,
    passthrough,
    question_text,
    resolve,
)
from ._streaming import EVENT, RUN_TYPE, StreamingStage

OnError = Literal["raise", "passthrough"]


class AlignerRunnable(StreamingStage, RunnableSerializable[Any, Any]):
    """Corrects a chain's answer with an Aligner; the output has the answer's type (``str`` or ``AIMessage``).

    Input: the answer itself (``str`` or ``AIMessage``), or a dict with the question under
    ``question_key`` and the answer under ``answer_key``. Without a question in the input, the
    question comes from ``config["configurable"][question_key]``, else from ``question``.
    """

    aligner: Aligner
    """The corrector (``aligner_core.Aligner``)."""
    question: str | None = None
    """A fixed question, for chains whose answer arrives without it."""
    question_key: str = "question"
    """Where the question is in a dict input, and its key in ``config["configurable"]``."""
    answer_key: str = "answer"
    """Where the answer is in a dict input."""
    on_error: OnError = "raise"
    """``"passthrough"`` returns the original answer when the corrector fails (error in metadata and log)."""
    generation_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Generation options for every correction (``max_new_tokens``, ``stop``, ...); call kwargs add to them."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    # -- helpers -------------------------------------------------------------------------------

    def _job(self, value: Any, config: RunnableConfig) -> Job:
        return resolve(
            value,
            question_key=self.question_key,
            answer_key=self.answer_key,
            question=self.question,
            configurable=config.get("configurable"),
        )

    def _options(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.generation_kwargs, **kwargs}

    def _settle(self, job: Job, result: Correction | BaseException) -> tuple[Any, dict[str, Any]]:
        """The output for a correction or an error (raised unless passing through), and its details."""
        name = self.aligner.name
        if isinstance(result, BaseException):
            if self.on_error == "raise" or isinstance(result, GenerationOptionError):
                raise result
            return passthrough(job, result, name), failure(job, result, name)
        return output(job, result, name)

    # -- invoke and batch ----------------------------------------------------------------------

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Correct one answer. ``kwargs`` are generation options for this call."""
        return self._call_with_config(self._invoke, input, config, run_type=RUN_TYPE, **kwargs)

    def _invoke(self, value: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig, **kwargs: Any) -> Any:
        job = self._job(value, config)
        if job.skip:
            return job.answer
        try:
            result: Correction | BaseException = self.aligner.correct(job.question, job.text, **self._options(kwargs))
        except Exception as exc:
            result = exc
        out, meta = self._settle(job, result)
        run_manager.get_child().on_custom_event(EVENT, meta, run_id=run_manager.run_id)
        return out

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Async ``invoke``: concurrent calls share the Aligner's batches."""
        return await self._acall_with_config(self._ainvoke, input, config, run_type=RUN_TYPE, **kwargs)

    async def _ainvoke(
        self, value: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig, **kwargs: Any
    ) -> Any:
        job = self._job(value, config)
        if job.skip:
            return job.answer
        try:
            result: Correction | BaseException = await self.aligner.acorrect(
                job.question, job.text, **self._options(kwargs)
            )
        except Exception as exc:
            result = exc
        out, meta = self._settle(job, result)
        await run_manager.get_child().on_custom_event(EVENT, meta, run_id=run_manager.run_id)
        return out

    def batch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """Correct many answers in one ``correct_batch`` pass (input order kept); one run per input."""
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
        """Async ``batch``: one ``acorrect_batch`` pass."""
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
        """Outputs in input order (exceptions in place) and the details to report per input index."""
        outs: list[Any] = [j if isinstance(j, Exception) else j.answer for j in jobs]
        metas: list[tuple[int, dict[str, Any]]] = []
        for i, result in zip(live, results):
            job = jobs[i]
            assert isinstance(job, Job)
            try:
                outs[i], meta = self._settle(job, result)
            except Exception as exc:
                outs[i] = exc
            else:
                metas.append((i, meta))
        return outs, metas

    def _batch(
        self,
        values: list[Any],
        run_manager: list[CallbackManagerForChainRun],
        config: list[RunnableConfig],
        *,
        fail_fast: bool,
        **kwargs: Any,
    ) -> list[Any]:
        jobs = self._jobs(values, config, fail_fast)
        live = [i for i, j in enumerate(jobs) if isinstance(j, Job) and not j.skip]
        pairs = [(jobs[i].question, jobs[i].text) for i in live]  # type: ignore[union-attr]
        results = self.aligner.correct_batch(pairs, return_exceptions=True, **self._options(kwargs)) if pairs else []
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
        jobs = self._jobs(values, config, fail_fast)
        live = [i for i, j in enumerate(jobs) if isinstance(j, Job) and not j.skip]
        pairs = [(jobs[i].question, jobs[i].text) for i in live]  # type: ignore[union-attr]
        results = (
            await self.aligner.acorrect_batch(pairs, return_exceptions=True, **self._options(kwargs)) if pairs else []
        )
        outs, metas = self._finish(jobs, live, results)
        for i, meta in metas:
            await run_manager[i].get_child().on_custom_event(EVENT, meta, run_id=run_manager[i].run_id)
        return outs


def with_aligner(
    chain: Runnable[Any, Any],
    *,
    aligner: Aligner,
    question_key: str = "question",
    on_error: OnError = "raise",
    generation_kwargs: Mapping[str, Any] | None = None,
) -> Runnable[Any, Any]:
    """Wrap ``chain`` so that its answer is corrected against the question in the chain's own input.

    The input may be a dict (the question under ``question_key``, as a str or messages), a str, a
    chat prompt value or a message list (the last human message is the question). The output has
    the chain's answer type; ``invoke``/``batch``/``stream`` and their async twins all work.
    """

    def question_of(value: Any) -> str:
        if isinstance(value, Mapping):
            if question_key not in value:
                raise MissingQuestionError(f"the chain input has no {question_key!r} key (keys: {sorted(map(str, value))})")
            value = value[question_key]
        return question_text(value)

    stage = AlignerRunnable(aligner=aligner, on_error=on_error, generation_kwargs=dict(generation_kwargs or {}))
    gather = RunnableParallel(question=RunnableLambda(question_of, name="question"), answer=chain)
    return (gather | stage).with_config(run_name="with_aligner")
