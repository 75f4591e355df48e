"""The Aligner facade: build a corrector, check each call's arguments, and hand the work on.

The ways to build one are in ``construction`` (inherited). What each step does lives beside the step: request
building and context fitting in ``requests``, many answers in ``batches``, the inspector gate in ``gating``, stream
plumbing in ``streaming``, template choice in ``templates``, progress in ``progress``, spans in ``telemetry``;
engines in ``engines``. Every entry point goes through the same path.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Sequence
from typing import Any, Literal, overload

from . import batches, gating, requests, streaming, telemetry
from .construction import Construction
from .correction import Correction
from .engines.base import Engine, GenerationOutput, GenerationParams
from .gating import OWN
from .items import as_sequence
from .progress import Progress, ProgressCallback, batch_tracker
from .requests import ContextArg, HistoryArg, OverflowPolicy, PreparedRequest
from .streaming import AsyncCorrectionStream, CorrectionStream
from .telemetry import span_of
from .templates import Template, choose_template


class Aligner(Construction):
    """A corrector: reads a question and an upstream answer, writes a better answer.

    Build one with :meth:`from_pretrained` (loads a model into this process, on the library's
    transformers engine or on vLLM), :meth:`from_server` (any OpenAI-compatible server: vLLM,
    SGLang, TGI, llama.cpp, Ollama) or :meth:`from_model` (wraps a model and tokenizer you already
    have). Every entry point goes through the same engine interface (``aligner_core.engines``).
    """

    def __init__(
        self,
        engine: Engine,
        template: Template,
        *,
        name: str = "",
        max_new_tokens: int = 1024,
        on_overflow: OverflowPolicy = "error",
        inspector: Any = None,
        threshold: float = 0.5,
    ) -> None:
        """``inspector`` (a ``(question, answer) -> score`` callable or an ``Inspector``) gates every call: answers
        scoring at or above ``threshold`` pass unchanged and cost no generation (docs/inspector.md)."""
        if on_overflow not in ("error", "truncate"):
            raise ValueError(f"on_overflow must be 'error' or 'truncate', got {on_overflow!r}")
        self.engine = engine
        self.template = template
        self.name = name
        self.on_overflow: OverflowPolicy = on_overflow
        self.defaults = GenerationParams(max_new_tokens=max_new_tokens)
        self.inspector, self.threshold = gating.checked(inspector, threshold)

    def __repr__(self) -> str:
        return f"Aligner(name={self.name!r}, template={self.template.name!r}, engine={self.engine.name!r})"

    @property
    def model_lock(self) -> threading.Lock:
        """Held while a local model runs; take it to share the loaded model (e.g. as an upstream LLM)."""
        lock = getattr(self.engine, "lock", None)
        if lock is None:
            raise AttributeError(f"the {self.engine.name!r} engine holds no local model to share")
        return lock

    # -- one answer --------------------------------------------------------------------------

    @span_of(batch=False)
    def correct(
        self,
        question: str,
        answer: str,
        *,
        history: HistoryArg = None,
        context: ContextArg = None,
        timeout: float | None = None,
        inspector: Any = OWN,
        threshold: float | None = None,
        **generation: Any,
    ) -> Correction:
        """Correct one answer. Generation options (``max_new_tokens``, ``do_sample``, ``stop``, ...) apply to this call.

        ``history`` holds the conversation's earlier turns (``[{"role": "user", "content": ...}, ...]``);
        the template decides how they reach the prompt (docs/conversations.md). ``context`` holds what the answer
        was grounded on (tool calls and results, retrieved documents; ``aligner_core.context``): the Aligner and the
        inspector see it, so grounded facts are not "corrected" away. ``inspector``/``threshold``
        override the Aligner's own gate for this call (``inspector=None``: no gate).

        ``timeout`` (seconds) bounds the wait: past it the request is cancelled and
        ``CorrectionTimeoutError`` raised, so a caller with a deadline is never held longer.
        """
        limit = requests.check_timeout(timeout)

        def run() -> Correction:
            return requests.run_one(
                self, *requests.prepare_one(self, question, answer, dict(generation), history, context), limit
            )

        return gating.one(self, inspector, threshold, question, answer, context, run)

    @span_of(batch=False)
    async def acorrect(
        self,
        question: str,
        answer: str,
        *,
        history: HistoryArg = None,
        context: ContextArg = None,
        timeout: float | None = None,
        inspector: Any = OWN,
        threshold: float | None = None,
        **generation: Any,
    ) -> Correction:
        """Async ``correct``: concurrent calls from many coroutines share the engine's batches.

        The event loop is never blocked. Cancelling the awaiting task drops the request if it has
        not started; ``timeout`` does the same after that many seconds (``CorrectionTimeoutError``).
        """
        limit = requests.check_timeout(timeout)

        async def run() -> Correction:
            return await requests.arun_one(
                self, *requests.prepare_one(self, question, answer, dict(generation), history, context), limit
            )

        return await gating.aone(self, inspector, threshold, question, answer, context, run)

    def stream(
        self,
        question: str,
        answer: str,
        *,
        history: HistoryArg = None,
        context: ContextArg = None,
        inspector: Any = OWN,
        threshold: float | None = None,
        **generation: Any,
    ) -> CorrectionStream:
        """Yield the correction as text deltas while it is generated.

        The deltas concatenate to exactly ``Correction.text``; the stream's ``correction``
        attribute holds the full ``Correction`` once the iterator is exhausted. ``close()`` stops
        generation early, and so does dropping the stream: the worker holds it only weakly.
        """
        gate = gating.choose(self, inspector, threshold)
        prepared, params = requests.prepare_one(self, question, answer, generation, history, context)
        stream = CorrectionStream()
        stream.span = telemetry.start(self, params, pairs=1, stream=True)
        streaming.produce(
            self, stream, prepared, params, gating.stream_verdict(*gate, gating.scored(prepared))
        )
        return stream

    def astream(
        self,
        question: str,
        answer: str,
        *,
        history: HistoryArg = None,
        context: ContextArg = None,
        inspector: Any = OWN,
        threshold: float | None = None,
        **generation: Any,
    ) -> AsyncCorrectionStream:
        """Async twin of :meth:`stream`: ``async for delta in aligner.astream(q, a)``."""
        loop = asyncio.get_running_loop()
        gate = gating.choose(self, inspector, threshold)
        prepared, params = requests.prepare_one(self, question, answer, generation, history, context)
        stream = AsyncCorrectionStream(loop)
        stream.span = telemetry.start(self, params, pairs=1, stream=True)
        stream._task = loop.create_task(streaming.aproduce(self, weakref.ref(stream), prepared, params, gate))
        return stream

    # -- many answers ------------------------------------------------------------------------

    @overload
    def correct_batch(
        self,
        pairs: Sequence[Any],
        *,
        show_progress: bool = ...,
        progress: ProgressCallback | Progress | None = ...,
        return_exceptions: Literal[False] = ...,
        max_new_tokens: int | Sequence[int] | None = ...,
        **generation: Any,
    ) -> list[Correction]: ...

    @overload
    def correct_batch(
        self,
        pairs: Sequence[Any],
        *,
        show_progress: bool = ...,
        progress: ProgressCallback | Progress | None = ...,
        return_exceptions: Literal[True],
        max_new_tokens: int | Sequence[int] | None = ...,
        **generation: Any,
    ) -> list[Correction | Exception]: ...

    @span_of(batch=True)
    def correct_batch(
        self,
        pairs: Sequence[Any],
        *,
        show_progress: bool = False,
        progress: ProgressCallback | Progress | None = None,
        return_exceptions: bool = False,
        max_new_tokens: int | Sequence[int] | None = None,
        inspector: Any = OWN,
        threshold: float | None = None,
        **generation: Any,
    ) -> list[Correction] | list[Correction | Exception]:
        """Correct many ``(question, answer)`` pairs (tuples or dicts) in planned batches; input order is kept.

        ``max_new_tokens`` may be one int or one per pair. With ``return_exceptions=True`` a bad
        pair yields its exception in its place and the others are still corrected, as in
        ``asyncio.gather``; otherwise all input is validated before any compute and the first
        problem is raised.

        Progress moves while the model decodes: ``show_progress`` draws a bar of completed pairs
        with generated tokens and tok/s beside it, and ``progress`` receives the same counts as
        ``ProgressUpdate`` snapshots (a callback, at most every 0.1 s and at each finished pair), or
        adds them to a ``Progress`` shared by several calls (its owner closes it).

        With an inspector (the Aligner's, or ``inspector=`` here), all pairs are scored in one batch first and only
        those below ``threshold`` are generated; the others come back unchanged with their score.
        """
        with batch_tracker(len(as_sequence(pairs)), show_progress, progress) as tracker:

            def run(subset: Sequence[Any], limits: Any, passed: int) -> list[Any]:
                options = {
                    "tracker": tracker,
                    "return_exceptions": return_exceptions,
                    "generation": generation,
                }
                return batches.run(self, subset, limits, passed=passed, **options)

            return gating.batch(self, inspector, threshold, pairs, max_new_tokens, run)

    @span_of(batch=True)
    async def acorrect_batch(
        self,
        pairs: Sequence[Any],
        *,
        return_exceptions: bool = False,
        max_new_tokens: int | Sequence[int] | None = None,
        inspector: Any = OWN,
        threshold: float | None = None,
        **generation: Any,
    ) -> list[Any]:
        """Async ``correct_batch``: all pairs go to the engine at once; input order is kept."""

        async def run(subset: Sequence[Any], limits: Any) -> list[Any]:
            return await batches.arun(
                self, subset, limits, return_exceptions=return_exceptions, generation=generation
            )

        return await gating.abatch(self, inspector, threshold, pairs, max_new_tokens, run)

    # -- the request path, for callers that drive an engine themselves ---------------------------

    def prepare(
        self,
        question: Any,
        answer: Any,
        params: GenerationParams,
        *,
        on_overflow: OverflowPolicy | None = None,
        max_new_tokens: int | None = None,
        index: int | None = None,
        history: HistoryArg = None,
        context: ContextArg = None,
    ) -> PreparedRequest:
        """Validate a pair (its history and context) and turn it into a generation request (``requests.prepare``)."""
        return requests.prepare(
            self,
            question,
            answer,
            params,
            on_overflow=on_overflow,
            max_new_tokens=max_new_tokens,
            index=index,
            history=history,
            context=context,
        )

    def build(
        self, prepared: PreparedRequest, out: GenerationOutput, *, latency: float | None = None
    ) -> Correction:
        """Turn an engine's output into the public ``Correction`` (``requests.build``)."""
        return requests.build(prepared, out, latency=latency)

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the engine (pending requests fail with a clear error)."""
        self.engine.close()

    def __enter__(self) -> Aligner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Aligner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)


__all__ = ["Aligner", "choose_template"]
