"""The correction kernel every LlamaIndex adapter corrects through: one answer (whole or streamed) for the engines
and AlignedLLM, a batch of retrieved nodes for the postprocessor.

It keeps the bookkeeping in one place: the core's decision (correct, or pass through with ``skipped``), an
``AlignerStartEvent``/``AlignerEndEvent`` around each pass, each generation as a LlamaIndex LLM call (through
:class:`~llamaindex_aligner._aligner_llm.AlignerLLM`, so LlamaIndex reports it), ``on_error``, and the details dict
(``aligner_core.reporting``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from llama_index.core.callbacks import CallbackManager
from llama_index.core.instrumentation import get_dispatcher

from aligner_core import Aligner, Correction
from aligner_core.decision import Decision
from aligner_core.inspector import Inspector, ScoreFn, as_inspector, check_threshold
from aligner_core.items import Item, unpack
from aligner_core.reporting import OnError, check_on_error, describe, details, failure_details, raises

from ._aligner_llm import AlignerLLM, Request, Slot, acompletions, call, completions, correction_of
from ._streams import Relay
from .events import AlignerEndEvent, AlignerStartEvent

dispatcher = get_dispatcher(__name__)
logger = logging.getLogger("llamaindex_aligner")

Turns = list[dict[str, str]] | None
Grounding = Sequence[Any] | None
Result = Correction | BaseException


def check_options(aligner: Aligner, options: Mapping[str, Any]) -> None:
    """Fail now, not mid-query, on a misspelled or invalid generation option (``on_overflow`` is per call too)."""
    overflow = options.get("on_overflow", "error")
    if overflow not in ("error", "truncate"):
        raise ValueError(f"on_overflow must be 'error' or 'truncate', got {overflow!r}")
    aligner.defaults.updated({k: v for k, v in options.items() if k != "on_overflow"})


class Corrector:
    """Corrects answers for one adapter (``component``) under its ``on_error`` policy.

    ``callback_manager`` returns the adapter's manager at each call (one set later is used): each generation is
    reported to it, and to instrumentation, as a call of the Aligner LLM. Without it no LLM call is reported
    (AlignedLLM's own call is the LLM call). ``inspector``/``threshold``, when set, replace the Aligner's own: an
    answer scoring at or above the threshold comes back unchanged, its verdict in the details and the events.
    """

    def __init__(
        self,
        aligner: Aligner,
        *,
        component: str,
        on_error: OnError = "raise",
        generation_kwargs: Mapping[str, Any] | None = None,
        inspector: Inspector | ScoreFn | None = None,
        threshold: float | None = None,
        include_original: bool = False,
        callback_manager: Callable[[], CallbackManager | None] | None = None,
    ) -> None:
        if not isinstance(aligner, Aligner):
            raise TypeError(f"aligner must be an aligner_core.Aligner, got {type(aligner).__name__}")
        self.on_error: OnError = check_on_error(on_error)
        self.generation_kwargs = dict(generation_kwargs or {})
        check_options(aligner, self.generation_kwargs)
        gate = {
            "inspector": None if inspector is None else as_inspector(inspector),
            "threshold": None if threshold is None else check_threshold(threshold),
        }
        self.gate = {k: v for k, v in gate.items() if v is not None}
        self.aligner, self.component, self.include_original = aligner, component, include_original
        self.llm = (
            None if callback_manager is None else AlignerLLM(aligner, component=component, gate=self.gate)
        )
        self._callback_manager = callback_manager

    # -- one answer --------------------------------------------------------------------------

    def correct(
        self, question: str, decision: Decision, history: Turns = None, context: Grounding = None
    ) -> dict[str, Any]:
        """The details of the answer ``decision`` says to correct (structured output kept only if it validates),
        or of why it passes through."""
        if not decision.corrects:
            return self.passed(question, decision)
        item, started = self._begin(question, decision, history, context)
        try:
            llm = self._reporter()
            correction = (
                correction_of(llm.complete(Request(self.aligner, item), **self.generation_kwargs))
                if llm
                else call(self.aligner.correct, item, self._options)
            )
        except Exception as exc:
            return self._failed(started, item.answer, exc)
        return self._done(started, decision.settle(correction))

    async def acorrect(
        self, question: str, decision: Decision, history: Turns = None, context: Grounding = None
    ) -> dict[str, Any]:
        if not decision.corrects:
            return self.passed(question, decision)
        item, started = self._begin(question, decision, history, context)
        try:
            llm = self._reporter()
            correction = (
                correction_of(await llm.acomplete(Request(self.aligner, item), **self.generation_kwargs))
                if llm
                else await call(self.aligner.acorrect, item, self._options)
            )
        except Exception as exc:
            return self._failed(started, item.answer, exc)
        return self._done(started, decision.settle(correction))

    def open(
        self, question: str, decision: Decision, history: Turns = None, context: Grounding = None
    ) -> tuple[dict[str, Any], Relay | None]:
        """Start streaming a correction now (so errors surface at the call), its details filled in place when the
        stream ends (``"pending": True`` until then). Only prose streams: structured output (opt-in) is validated
        before anything is sent, so it is corrected whole, and an answer that passes is sent as it is (no relay)."""
        if not _streams(decision):
            return self.correct(question, decision, history, context), None
        item, started = self._begin(question, decision, history, context)
        try:
            llm = self._reporter()
            responses = (
                llm.stream_complete(Request(self.aligner, item), **self.generation_kwargs)
                if llm
                else completions(call(self.aligner.stream, item, self._options))
            )
        except Exception as exc:
            return self._failed(started, item.answer, exc), None
        return self._relay(responses, decision, item.answer, started)

    async def aopen(
        self, question: str, decision: Decision, history: Turns = None, context: Grounding = None
    ) -> tuple[dict[str, Any], Relay | None]:
        if not _streams(decision):
            return await self.acorrect(question, decision, history, context), None
        item, started = self._begin(question, decision, history, context)
        try:
            llm = self._reporter()
            responses = (
                await llm.astream_complete(Request(self.aligner, item), **self.generation_kwargs)
                if llm
                else acompletions(call(self.aligner.astream, item, self._options))
            )
        except Exception as exc:
            return self._failed(started, item.answer, exc), None
        return self._relay(responses, decision, item.answer, started)

    def passed(self, question: str, decision: Decision) -> dict[str, Any]:
        """The details of an answer passed through unchanged, with the core's reason (``skipped``)."""
        return self._details(decision.passthrough(question))

    # -- a batch -----------------------------------------------------------------------------

    def correct_batch(
        self, question: str, pairs: Sequence[Mapping[str, Any]], num_items: int
    ) -> list[Result]:
        """Correct the core's dict pairs in one batched call (``num_items``: what the adapter received, for the
        events). Under ``on_error="passthrough"`` a pair the Aligner fails on (every pair, if the whole batch fails)
        comes back as its exception; otherwise the first failure raises."""
        started, slots, calls = self._begin_batch(question, pairs, num_items)
        try:
            results = (
                self.aligner.correct_batch(pairs, return_exceptions=self._tolerant, **self._options)
                if pairs
                else []
            )
        except Exception as exc:
            return self._end_batch(started, num_items, slots, calls, [exc] * len(pairs), exc)
        return self._end_batch(started, num_items, slots, calls, results)

    async def acorrect_batch(
        self, question: str, pairs: Sequence[Mapping[str, Any]], num_items: int
    ) -> list[Result]:
        started, slots, calls = self._begin_batch(question, pairs, num_items)
        try:
            results = (
                await self.aligner.acorrect_batch(pairs, return_exceptions=self._tolerant, **self._options)
                if pairs
                else []
            )
        except Exception as exc:
            return self._end_batch(started, num_items, slots, calls, [exc] * len(pairs), exc)
        return self._end_batch(started, num_items, slots, calls, results)

    # -- steps -------------------------------------------------------------------------------

    @property
    def _options(self) -> dict[str, Any]:
        return {**self.generation_kwargs, **self.gate}

    @property
    def _tolerant(self) -> bool:
        return self.on_error == "passthrough"

    def _reporter(self) -> AlignerLLM | None:
        """The Aligner LLM, reporting to the adapter's callback manager now; None when calls are not reported."""
        if self.llm is None or self._callback_manager is None:
            return None
        manager = self._callback_manager()
        self.llm.callback_manager = manager if isinstance(manager, CallbackManager) else CallbackManager([])
        return self.llm

    def _start(self, question: str, num_items: int, num_selected: int) -> float:
        dispatcher.event(
            AlignerStartEvent(
                component=self.component, query=question, num_items=num_items, num_selected=num_selected
            )
        )
        return time.perf_counter()

    def _begin(
        self, question: str, decision: Decision, history: Turns, context: Grounding
    ) -> tuple[Item, float]:
        return Item(question, decision.text, history or None, context or None), self._start(question, 1, 1)

    def _begin_batch(
        self, question: str, pairs: Sequence[Mapping[str, Any]], num_items: int
    ) -> tuple[float, list[Slot], list[Iterator[Any]]]:
        """Open one LLM call per pair before the batch runs; each ends once its slot is filled (:meth:`_end_batch`)."""
        started = self._start(question, num_items, len(pairs))
        llm = self._reporter()
        slots = [Slot() for _ in pairs]
        calls = (
            [
                llm.stream_complete(Request(self.aligner, unpack(pair, i), slot), **self.generation_kwargs)
                for i, (pair, slot) in enumerate(zip(pairs, slots))
            ]
            if llm
            else []
        )
        return started, slots, calls

    def _end_batch(
        self,
        started: float,
        num_items: int,
        slots: Sequence[Slot],
        calls: Sequence[Iterator[Any]],
        results: Sequence[Result],
        failure: Exception | None = None,
    ) -> list[Result]:
        for slot, result in zip(slots, results):
            slot.fill(result)
        for responses in calls:  # LlamaIndex ends each pair's call: with its correction, or with its error
            with contextlib.suppress(Exception):
                deque(responses, maxlen=0)
        self._end(started, num_items, results)
        if failure is not None and raises(self.on_error, failure):
            raise failure
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            logger.warning(
                "%d of %d answers passed through uncorrected: %s",
                len(errors),
                len(results),
                describe(errors[0]),
            )
        return list(results)

    def _relay(
        self, responses: Any, decision: Decision, answer: str, started: float
    ) -> tuple[dict[str, Any], Relay]:
        info: dict[str, Any] = {"model": self.aligner.name, "text": None, "pending": True}
        return info, Relay(
            responses,
            answer,
            info,
            done=lambda correction: self._done(started, decision.settle(correction)),
            fail=lambda exc, partial: self._failed(started, answer, exc, partial=partial),
        )

    def _details(self, correction: Correction) -> dict[str, Any]:
        model = self.aligner.name
        return {
            **details(correction, model=model, include_original=self.include_original, keep_text=True),
            "error": None,
        }

    def _done(self, started: float, correction: Correction) -> dict[str, Any]:
        """The details of a finished correction; an empty correction is never better, so the original stays."""
        self._end(started, 1, [correction])
        info = self._details(correction)
        if not correction.text.strip():
            info.update(text=correction.original, changed=False, similarity=1.0, empty_correction=True)
        return info

    def _failed(
        self, started: float, answer: str, exc: Exception, *, partial: bool = False
    ) -> dict[str, Any]:
        """Raise ``exc`` (``on_error="raise"``, or a misspelled option) or describe the passthrough."""
        self._end(started, 1, [exc])
        if raises(self.on_error, exc):
            raise exc
        logger.warning("the Aligner failed, passing the answer through: %s", describe(exc))
        info = {**failure_details(answer, exc, model=self.aligner.name), "text": answer}
        if partial:
            info["partial"] = True  # the stream failed after some of the correction was sent
        return info

    def _end(self, started: float, num_items: int, results: Sequence[Result]) -> None:
        """Report the pass. ``num_corrected`` counts items whose text a correction replaced: an answer the
        inspector passed is served as it was and is not counted, for one answer as for a batch of nodes."""
        corrections = [r for r in results if isinstance(r, Correction)]
        errors = [r for r in results if not isinstance(r, Correction)]
        scores = [c.metadata["inspector_score"] for c in corrections if "inspector_score" in c.metadata]
        passed = sum(1 for c in corrections if c.metadata.get("inspector_passed"))
        dispatcher.event(
            AlignerEndEvent(
                component=self.component,
                num_items=num_items,
                num_corrected=sum(
                    1 for c in corrections if c.text.strip() and not c.metadata.get("inspector_passed")
                ),
                num_changed=sum(1 for c in corrections if c.changed and c.text.strip()),
                num_errors=len(errors),
                prompt_tokens=sum(c.prompt_tokens for c in corrections),
                completion_tokens=sum(c.completion_tokens for c in corrections),
                latency_s=time.perf_counter() - started,
                error=describe(errors[0]) if errors else None,
                num_inspected=len(scores),
                num_inspector_passed=passed,
                inspector_scores=scores,
            )
        )


def _streams(decision: Decision) -> bool:
    return decision.corrects and decision.structure is None
