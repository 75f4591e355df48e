"""The Aligner facade: validate, render, plan, generate, and return ``Correction`` objects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

from . import telemetry
from .context import Context, context_of, context_texts, normalize_context
from .correction import Correction
from .engines.base import Engine, GenerationOutput, GenerationParams, GenerationRequest
from .errors import (
    AlignerError,
    ContextOverflowError,
    CorrectionTimeoutError,
    EmptyAnswerError,
    GenerationOptionError,
    InvalidInputError,
    TemplateError,
)
from .history import History, history_of, history_texts, normalize_history, render_prompt
from .plaintext import encode_plain, holds_special
from .progress import Progress, ProgressCallback, tracking
from .streaming import AsyncCorrectionStream, CorrectionStream, StreamCancelled, TextDeltas
from .telemetry import span_of
from .templates import ChatTemplate, Template, get_template

logger = logging.getLogger("aligner_core")

OverflowPolicy = Literal["error", "truncate"]
Pair = "tuple[str, str] | Mapping[str, str]"

#: Planning assumes a correction is at most about twice the answer (plus room for a short answer).
RESERVE_FACTOR, RESERVE_MIN = 2, 64


@dataclass(frozen=True)
class _Prepared:
    question: str
    answer: str
    request: GenerationRequest
    metadata: dict[str, Any]
    history: History = ()
    context: Context = ()


#: "Use the Aligner's own inspector": a call's ``inspector=`` left out (``None`` turns gating off for the call).
_OWN: Any = type("_Own", (), {"__repr__": lambda self: "<the Aligner's inspector>"})()

#: A conversation's earlier turns as callers pass them: ``[{"role": ..., "content": ...}, ...]`` or None.
HistoryArg = Sequence[Mapping[str, str]] | None
#: What an answer was grounded on: ``[{"type": "tool_result", "name": ..., "content": ...}, "a document", ...]``.
ContextArg = Sequence[Mapping[str, Any] | str] | str | None


class Aligner:
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
        self.inspector, self.threshold = _gating(inspector, threshold)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str],
        *,
        template: str | Template | None = None,
        engine: Literal["transformers", "vllm"] = "transformers",
        dtype: Any = "auto",
        device: str | None = None,
        device_map: Any = None,
        gguf_file: str | None = None,
        adapter: str | os.PathLike[str] | None = None,
        quantization: Any = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        revision: str | None = None,
        max_new_tokens: int = 1024,
        max_batch_tokens: int | None = None,
        on_overflow: OverflowPolicy = "error",
        max_wait_ms: float = 5.0,
        inspector: Any = None,
        threshold: float = 0.5,
        **engine_kwargs: Any,
    ) -> Aligner:
        """Load an Aligner from a hub id, a local directory or a GGUF file.

        ``template=None`` picks the template recorded in the model (or adapter) directory, then
        ``aligner-v1`` for the official ``aligner/aligner-*`` checkpoints, then ``chat`` when the
        tokenizer has a chat template. ``allow_pickle`` opts in to ``.bin`` weights.

        ``engine="vllm"`` runs the model on vLLM in this process (``pip install
        "llm-aligner[vllm]"``): ``speculative`` (n-gram prompt lookup, default on),
        ``num_speculative_tokens``, ``prompt_lookup_max`` and ``enable_prefix_caching`` (default on)
        are taken, the rest of ``engine_kwargs`` go to ``vllm.AsyncEngineArgs``
        (``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``, ...).
        """
        if engine == "vllm":
            from .engines.vllm import VLLMEngine

            if adapter is not None or device is not None or device_map is not None:
                raise ValueError("adapter, device and device_map apply to engine='transformers'; merge the adapter "
                                 "first and let vLLM place the model (tensor_parallel_size=...)")
            vllm_engine, source, tokenizer = VLLMEngine.from_pretrained(
                model, dtype=dtype, gguf_file=gguf_file, quantization=quantization, revision=revision,
                trust_remote_code=trust_remote_code, **engine_kwargs,
            )
            chosen = template if template is not None else choose_template(source, tokenizer)
            return cls(vllm_engine, _bind(chosen, tokenizer), name=source.name,
                       max_new_tokens=max_new_tokens, on_overflow=on_overflow, inspector=inspector, threshold=threshold)
        if engine != "transformers":
            raise ValueError(f"engine must be 'transformers' or 'vllm', got {engine!r} (for a server use Aligner.from_server)")
        if engine_kwargs:
            raise TypeError(f"unexpected keyword argument(s) for engine='transformers': {sorted(engine_kwargs)}")
        from .loading import load_model

        loaded, tokenizer, source = load_model(
            model,
            dtype=dtype,
            device=device,
            device_map=device_map,
            gguf_file=gguf_file,
            adapter=adapter,
            quantization=quantization,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            revision=revision,
        )
        if template is None:
            template = choose_template(source, tokenizer, adapter=adapter)
        return cls.from_model(
            loaded,
            tokenizer,
            template=template,
            name=source.name,
            max_new_tokens=max_new_tokens,
            max_batch_tokens=max_batch_tokens,
            on_overflow=on_overflow,
            max_wait_ms=max_wait_ms,
            inspector=inspector,
            threshold=threshold,
        )

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        template: str | Template = "chat",
        name: str = "",
        max_new_tokens: int = 1024,
        max_batch_tokens: int | None = None,
        max_batch_size: int | None = None,
        on_overflow: OverflowPolicy = "error",
        max_wait_ms: float = 5.0,
        max_queue: int = 4096,
        inspector: Any = None,
        threshold: float = 0.5,
    ) -> Aligner:
        """Wrap a transformers model and tokenizer that are already loaded."""
        from .engines.local import TransformersEngine

        engine = TransformersEngine(
            model, tokenizer, max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms, max_queue=max_queue,
        )
        return cls(
            engine,
            _bind(template, tokenizer),
            name=name or str(getattr(model, "name_or_path", "")),
            max_new_tokens=max_new_tokens,
            on_overflow=on_overflow,
            inspector=inspector,
            threshold=threshold,
        )

    @classmethod
    def from_server(
        cls,
        base_url: str,
        *,
        model: str | None = None,
        template: str | Template | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        max_concurrency: int = 64,
        tokenizer: Any = None,
        max_new_tokens: int = 1024,
        on_overflow: OverflowPolicy = "error",
        extra_body: Mapping[str, Any] | None = None,
        inspector: Any = None,
        threshold: float = 0.5,
    ) -> Aligner:
        """Correct through any OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, Ollama).

        No local model or GPU is needed. The exact rendered template goes to ``/v1/completions``
        (greedy by default); ``model=None`` takes the one model the server serves. ``template=None``
        picks ``aligner-v1`` for the official checkpoints, the template recorded in the served
        directory when it is readable here, else ``chat`` (the server applies the model's chat
        template). ``tokenizer`` (a tokenizer object, hub id or directory) is optional: with it,
        prompts are counted and checked against the server's context before they are sent.
        ``api_key`` defaults to ``$OPENAI_API_KEY``. Faults are per request: connection errors,
        timeouts, 429 and 5xx are retried ``max_retries`` times with backoff.
        """
        from .engines.server import ServerEngine

        engine = ServerEngine(
            base_url, model=model, api_key=api_key, timeout=timeout, max_retries=max_retries,
            max_concurrency=max_concurrency, tokenizer=tokenizer, extra_body=extra_body,
        )
        try:
            if template is None:
                template = engine.choose_template()
            chosen = _bind(template, engine.tokenizer) if engine.tokenizer is not None else _resolve(template)
        except BaseException:
            engine.close()
            raise
        return cls(engine, chosen, name=engine.model_name or base_url, max_new_tokens=max_new_tokens,
                   on_overflow=on_overflow, inspector=inspector, threshold=threshold)

    def __repr__(self) -> str:
        return f"Aligner(name={self.name!r}, template={self.template.name!r}, engine={self.engine.name!r})"

    @property
    def backend(self) -> Engine:
        """The engine (the first release's name for it)."""
        return self.engine

    @property
    def model_lock(self) -> threading.Lock:
        """Held while a local model runs; take it to share the loaded model (e.g. as an upstream LLM)."""
        lock = getattr(self.engine, "lock", None)
        if lock is None:
            raise AttributeError(f"the {self.engine.name!r} engine holds no local model to share")
        return lock

    # -- public API --------------------------------------------------------------------------

    @span_of(batch=False)
    def correct(
        self, question: str, answer: str, *, history: HistoryArg = None, context: ContextArg = None,
        timeout: float | None = None, inspector: Any = _OWN, threshold: float | None = None, **generation: Any,
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
        gate_with, level = self._gate(inspector, threshold)
        if gate_with is not None:
            from .inspector import correct_gated

            return correct_gated(question, answer, gate_with, level, metadata=self._gate_metadata(), context=context,
                                 correct=lambda: self.correct(question, answer, history=history, context=context,
                                                              timeout=timeout, inspector=None, **generation))
        limit = _check_timeout(timeout)
        prepared, params = self._prepare_one(question, answer, generation, history, context)
        start = time.perf_counter()
        future = self.engine.submit(prepared.request, params)
        try:
            out = future.result(timeout=limit)
        except TimeoutError as exc:
            if isinstance(exc, AlignerError):  # the engine's own timeout (a server engine), not this call's
                raise
            future.cancel()
            raise CorrectionTimeoutError(f"the correction took longer than timeout={limit:g}s") from exc
        return self.build(prepared, out, latency=time.perf_counter() - start)

    @span_of(batch=False)
    async def acorrect(
        self, question: str, answer: str, *, history: HistoryArg = None, context: ContextArg = None,
        timeout: float | None = None, inspector: Any = _OWN, threshold: float | None = None, **generation: Any,
    ) -> Correction:
        """Async ``correct``: concurrent calls from many coroutines share the engine's batches.

        The event loop is never blocked. Cancelling the awaiting task drops the request if it has
        not started; ``timeout`` does the same after that many seconds (``CorrectionTimeoutError``).
        """
        gate_with, level = self._gate(inspector, threshold)
        if gate_with is not None:
            from .inspector import acorrect_gated

            return await acorrect_gated(
                question, answer, gate_with, level, metadata=self._gate_metadata(), context=context,
                acorrect=lambda: self.acorrect(question, answer, history=history, context=context, timeout=timeout,
                                               inspector=None, **generation))
        limit = _check_timeout(timeout)
        prepared, params = self._prepare_one(question, answer, generation, history, context)
        start = time.perf_counter()
        try:
            out = await asyncio.wait_for(self.engine.agenerate(prepared.request, params), limit)
        except TimeoutError as exc:
            if isinstance(exc, AlignerError):  # the engine's own timeout (a server engine), not this call's
                raise
            raise CorrectionTimeoutError(f"the correction took longer than timeout={limit:g}s") from exc
        return self.build(prepared, out, latency=time.perf_counter() - start)

    @span_of(batch=True)
    async def acorrect_batch(
        self,
        pairs: Sequence[Any],
        *,
        return_exceptions: bool = False,
        max_new_tokens: int | Sequence[int] | None = None,
        inspector: Any = _OWN,
        threshold: float | None = None,
        **generation: Any,
    ) -> list[Any]:
        """Async ``correct_batch``: all pairs go to the engine at once; input order is kept."""
        gate_with, level = self._gate(inspector, threshold)
        if gate_with is not None:
            from .inspector import agate

            verdict = await agate(gate_with, pairs, level)
            corrected = await self.acorrect_batch(
                [pairs[i] for i in verdict.failing], return_exceptions=return_exceptions, inspector=None,
                max_new_tokens=_subset(max_new_tokens, verdict.failing, len(pairs)), **generation,
            ) if verdict.failing else []
            return self._merge_verdict(pairs, verdict, corrected)
        slots, params = self._prepare_all(pairs, return_exceptions, max_new_tokens, generation)
        start = time.perf_counter()

        async def one(slot: _Prepared | Exception) -> Correction:
            if isinstance(slot, Exception):
                raise slot
            out = await self.engine.agenerate(slot.request, params)
            return self.build(slot, out, latency=time.perf_counter() - start)

        return list(await asyncio.gather(*(one(s) for s in slots), return_exceptions=return_exceptions))

    def stream(
        self, question: str, answer: str, *, history: HistoryArg = None, context: ContextArg = None,
        inspector: Any = _OWN, threshold: float | None = None, **generation: Any,
    ) -> CorrectionStream:
        """Yield the correction as text deltas while it is generated.

        The deltas concatenate to exactly ``Correction.text``; the stream's ``correction``
        attribute holds the full ``Correction`` once the iterator is exhausted. ``close()`` stops
        generation early, and so does dropping the stream: the worker holds it only weakly.
        """
        gate_with, level = self._gate(inspector, threshold)
        prepared, params = self._prepare_one(question, answer, generation, history, context)
        stream = CorrectionStream()
        stream.span = telemetry.start(self, params, pairs=1, stream=True)
        if gate_with is not None:
            from .inspector import gate

            verdict = (gate(gate_with, [_scored(prepared)], level).scores[0], level)
            if self._stream_passed(stream, prepared, verdict):
                return stream
        else:
            verdict = None
        self._produce(weakref.ref(stream), prepared, params, verdict)
        return stream

    def _stream_passed(self, stream: Any, prepared: _Prepared, verdict: tuple[float | None, float]) -> bool:
        """When the answer passed the inspector, it is the correction: stream it as one delta and end."""
        from .inspector import passed_correction, passes

        score, level = verdict
        if score is None or not passes(score, level):
            return False
        stream.put(prepared.answer)
        stream.done(passed_correction(prepared.question, prepared.answer, score, threshold=level,
                                      metadata=self._gate_metadata()))
        return True

    def _produce(
        self, ref: weakref.ref[CorrectionStream], prepared: _Prepared, params: GenerationParams,
        verdict: tuple[float, float] | None = None,
    ) -> None:
        deltas = TextDeltas(params.stop)
        start = time.perf_counter()

        def finished(future: Any) -> None:
            if (stream := ref()) is not None:
                self._finish_stream(stream, deltas, prepared, future, start, verdict)

        future = self.engine.stream(prepared.request, params, lambda text: _deliver(ref, deltas.update(text)))
        future.add_done_callback(finished)

    def astream(
        self, question: str, answer: str, *, history: HistoryArg = None, context: ContextArg = None,
        inspector: Any = _OWN, threshold: float | None = None, **generation: Any,
    ) -> AsyncCorrectionStream:
        """Async twin of :meth:`stream`: ``async for delta in aligner.astream(q, a)``."""
        loop = asyncio.get_running_loop()
        gating = self._gate(inspector, threshold)
        prepared, params = self._prepare_one(question, answer, generation, history, context)
        stream = AsyncCorrectionStream(loop)
        stream.span = telemetry.start(self, params, pairs=1, stream=True)
        stream._task = loop.create_task(self._aproduce(weakref.ref(stream), loop, prepared, params, gating))
        return stream

    async def _aproduce(
        self, ref: weakref.ref[AsyncCorrectionStream], loop: asyncio.AbstractEventLoop, prepared: _Prepared,
        params: GenerationParams, gating: tuple[Any, float] = (None, 0.5),
    ) -> None:
        verdict = None
        if gating[0] is not None:
            from .inspector import agate

            try:
                verdict = ((await agate(gating[0], [_scored(prepared)], gating[1])).scores[0], gating[1])
            except Exception as exc:
                if (stream := ref()) is not None:
                    stream.done(None, exc)
                return
            if (stream := ref()) is None or self._stream_passed(stream, prepared, verdict):
                return
        deltas = TextDeltas(params.stop)
        start = time.perf_counter()
        future: asyncio.Future[GenerationOutput] = loop.create_future()
        try:
            future.set_result(
                await self.engine.astream(prepared.request, params, lambda text: _deliver(ref, deltas.update(text)))
            )
        except asyncio.CancelledError:
            if (stream := ref()) is not None:
                stream.done(None)
            raise
        except BaseException as exc:
            future.set_exception(exc)
        if (stream := ref()) is not None:
            self._finish_stream(stream, deltas, prepared, future, start, verdict)

    def _finish_stream(
        self, stream: Any, deltas: TextDeltas, prepared: _Prepared, future: Any, start: float,
        verdict: tuple[float | None, float] | None = None,
    ) -> None:
        error = future.exception()
        if isinstance(error, StreamCancelled):
            stream.done(None)
            return
        if error is not None:
            stream.done(None, error)
            return
        correction = self.build(prepared, future.result(), latency=time.perf_counter() - start)
        if verdict is not None and verdict[0] is not None:
            from .inspector import inspected

            correction = inspected(correction, verdict[0], threshold=verdict[1])
        with contextlib.suppress(StreamCancelled):
            stream.put(deltas.finish(correction.text))
        stream.done(correction)

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
        inspector: Any = _OWN,
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
        gate_with, level = self._gate(inspector, threshold)
        if gate_with is not None:
            from .inspector import gate

            verdict = gate(gate_with, pairs, level)
            with self._progress(len(pairs), show_progress, progress) as tracker:
                if tracker is not None:
                    tracker.update(rows=len(verdict.passed))  # passed pairs are done: no generation
                corrected = self.correct_batch(
                    [pairs[i] for i in verdict.failing], progress=tracker, return_exceptions=return_exceptions,
                    max_new_tokens=_subset(max_new_tokens, verdict.failing, len(pairs)), inspector=None, **generation,
                ) if verdict.failing else []
            return self._merge_verdict(pairs, verdict, corrected)
        slots, params = self._prepare_all(pairs, return_exceptions, max_new_tokens, generation)
        live = [i for i, s in enumerate(slots) if isinstance(s, _Prepared)]
        results: list[Correction | Exception] = [s for s in slots]  # type: ignore[misc]
        with self._progress(len(pairs), show_progress, progress) as tracker:
            if tracker is not None:
                tracker.update(rows=len(pairs) - len(live))  # pairs refused before any compute
            outputs = self._generate_with_progress(
                [slots[i].request for i in live],  # type: ignore[union-attr]
                params,
                fail_fast=not return_exceptions,
                progress=tracker,
            )
        for i, out in zip(live, outputs):
            prepared = slots[i]
            assert isinstance(prepared, _Prepared)
            results[i] = out if isinstance(out, BaseException) else self.build(prepared, out)  # type: ignore[assignment]
        return results

    @contextlib.contextmanager
    def _progress(
        self, total: int, show: bool, progress: ProgressCallback | Progress | None
    ) -> Iterator[Progress | None]:
        """The tracker of one ``correct_batch`` (the caller's shared one, or a new one), with a bar when shown."""
        if not show and progress is None:
            yield None  # nobody watches: the engine skips counting
            return
        from tqdm.auto import tqdm

        shared = progress if isinstance(progress, Progress) else None
        with (
            tqdm(
                total=shared.total if shared else total, initial=shared.rows if shared else 0,
                desc="Correcting", unit="pair", disable=not show,
            ) as bar,
            tracking(progress, bar, total=None if shared else total) as tracker,  # a shared total is its owner's
        ):
            yield tracker

    def _generate_with_progress(
        self, requests: list[GenerationRequest], params: GenerationParams, *, fail_fast: bool, progress: Progress | None
    ) -> list[GenerationOutput | BaseException]:
        """``engine.generate`` with live progress; an engine written before ``progress=`` reports rows as they finish."""
        if progress is None:
            return self.engine.generate(requests, params, fail_fast=fail_fast)
        if _takes_progress(self.engine):
            return self.engine.generate(requests, params, fail_fast=fail_fast, progress=progress)
        return self.engine.generate(
            requests, params, fail_fast=fail_fast,
            on_result=lambda _i, out: progress.update(
                tokens=0 if isinstance(out, BaseException) else out.completion_tokens, rows=1
            ),
        )

    # -- the inspector gate --------------------------------------------------------------------

    def _gate(self, inspector: Any, threshold: float | None) -> tuple[Any, float]:
        """The inspector and threshold of one call: the Aligner's own unless the call names others."""
        chosen = self.inspector if inspector is _OWN else inspector
        return _gating(chosen, self.threshold if threshold is None else threshold)

    def _gate_metadata(self) -> dict[str, Any]:
        return {"template": self.template.name, "engine": self.engine.name}

    def _merge_verdict(self, pairs: Sequence[Any], verdict: Any, corrected: Sequence[Any]) -> list[Any]:
        from .inspector import merge_verdict

        return merge_verdict(pairs, verdict, corrected, self._gate_metadata())

    # -- the shared path ---------------------------------------------------------------------

    def _prepare_one(
        self, question: Any, answer: Any, generation: dict[str, Any], history: HistoryArg = None,
        context: ContextArg = None,
    ) -> tuple[_Prepared, GenerationParams]:
        overflow = generation.pop("on_overflow", None)
        params = self.defaults.updated(generation)
        return self.prepare(question, answer, params, on_overflow=overflow, history=history, context=context), params

    def _prepare_all(
        self,
        pairs: Sequence[Any],
        return_exceptions: bool,
        max_new_tokens: int | Sequence[int] | None,
        generation: dict[str, Any],
    ) -> tuple[list[_Prepared | Exception], GenerationParams]:
        """Validate and render every pair; the first problem is raised unless ``return_exceptions``."""
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
            raise InvalidInputError(f"pairs must be a sequence of (question, answer) pairs, got {type(pairs).__name__}")
        overflow = generation.pop("on_overflow", None)
        params = self.defaults.updated(generation)
        limits = _per_item_limits(max_new_tokens, len(pairs), params.max_new_tokens)
        slots: list[_Prepared | Exception] = []
        for i, (pair, limit) in enumerate(zip(pairs, limits)):
            try:
                q, a, h, c = _unpack(pair, i)
                slots.append(self.prepare(q, a, params, on_overflow=overflow, max_new_tokens=limit, index=i,
                                          history=h, context=c))
            except AlignerError as exc:
                if not return_exceptions:
                    raise
                slots.append(exc)
        return slots, params

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
    ) -> _Prepared:
        """Validate a pair (its history and context) and turn it into a generation request (raises specific errors).

        When the prompt does not fit the model's context, grounding context is dropped first (the item farthest
        from the question first), then ``on_overflow`` applies to the answer.
        """
        where = "" if index is None else f"pair {index}: "
        for field_name, value in (("question", question), ("answer", answer)):
            if not isinstance(value, str):
                raise InvalidInputError(f"{where}{field_name} must be a str, got {type(value).__name__}")
            _check_text(where, field_name, value)
        turns = normalize_history(history, where)
        grounding = normalize_context(context, where)
        if not answer.strip():
            raise EmptyAnswerError(f"{where}the answer is empty or whitespace: there is nothing to correct")
        policy = on_overflow or self.on_overflow
        if policy not in ("error", "truncate"):
            raise ValueError(f"on_overflow must be 'error' or 'truncate', got {policy!r}")
        limit = max_new_tokens or params.max_new_tokens
        metadata: dict[str, Any] = {"template": self.template.name, "engine": self.engine.name}
        if turns:
            metadata["history_turns"] = len(turns)
        user_texts = (*history_texts(turns), *context_texts(grounding))
        if ambiguous := _template_markers_in(self.template, question, answer, *user_texts):
            metadata["template_markers_in_text"] = ambiguous
        if not (self.engine.tokenizes_locally or policy == "truncate"):
            # The engine counts tokens on its side; an overlong prompt fails there with ContextOverflowError.
            if grounding:
                metadata["context_items"] = len(grounding)
            request = self._remote_request(question, answer, limit, turns, grounding)
            return _Prepared(question, answer, request, metadata, turns, grounding)
        plain = self._holds_special(question, answer, *user_texts)
        if plain:
            metadata["special_token_text"] = True  # encoded as plain text, never as control tokens
        prompt, ids = self._render(question, answer, plain=plain, history=turns, context=grounding)
        ctx = self.engine.context_length
        if grounding:
            kept = grounding
            if ctx is not None and len(ids) + limit > ctx:  # the context is the first to give way
                kept, prompt, ids = self._fit_context(question, answer, plain, turns, grounding, ctx - limit)
            bare = len(self._render(question, answer, plain=plain, history=turns)[1])
            metadata.update(context_items=len(kept), context_tokens=len(ids) - bare)
            if len(kept) < len(grounding):
                metadata["context_trimmed"] = len(grounding) - len(kept)
            grounding = kept
        answer_ids = self._encode_answer(answer, plain)
        cut = None
        if ctx is not None and len(ids) + limit > ctx:
            if policy == "error":
                raise ContextOverflowError(
                    f"{where}the prompt is {len(ids)} tokens and max_new_tokens is {limit}, more than the model's "
                    f"context of {ctx}: shorten the answer, lower max_new_tokens, or pass on_overflow='truncate'"
                )
            keep = len(answer_ids) - (len(ids) + limit - ctx)
            if keep < 1:
                raise ContextOverflowError(
                    f"{where}even with the answer cut to nothing the prompt and max_new_tokens={limit} exceed the "
                    f"context of {ctx} tokens: lower max_new_tokens or shorten the question"
                )
            cut = self.engine.decode(answer_ids[:keep])
            prompt, ids = self._render(question, cut, plain=plain, history=turns, context=grounding)
            while len(ids) + limit > ctx and keep > 1:  # re-tokenizing at the seam can add a token
                keep -= 1
                cut = self.engine.decode(answer_ids[:keep])
                prompt, ids = self._render(question, cut, plain=plain, history=turns, context=grounding)
            metadata.update(truncated=True, answer_tokens_kept=keep, answer_tokens=len(answer_ids))
            answer_ids = answer_ids[:keep]
        if not self.engine.tokenizes_locally:
            request = self._remote_request(question, cut or answer, limit, turns, grounding)
            return _Prepared(question, answer, request, metadata, turns, grounding)
        reserve = min(limit, max(RESERVE_MIN, RESERVE_FACTOR * len(answer_ids)))
        request = GenerationRequest(
            prompt=prompt, prompt_ids=tuple(ids), max_new_tokens=limit, reserve=reserve, draft_ids=tuple(answer_ids),
            add_special_tokens=self.template.add_special_tokens, exact_ids=plain,
        )
        return _Prepared(question=question, answer=answer, request=request, metadata=metadata, history=turns,
                         context=grounding)

    def _fit_context(
        self, question: str, answer: str, plain: bool, turns: History, grounding: Context, budget: int
    ) -> tuple[Context, str, list[int]]:
        """The longest tail of ``grounding`` whose prompt fits ``budget`` tokens (the items farthest from the
        question go first), found by bisection; the empty context when none fits."""
        low, high = 1, len(grounding)  # drop at least one item, at most all of them
        best: tuple[Context, str, list[int]] | None = None
        while low <= high:
            drop = (low + high) // 2
            kept = grounding[drop:]
            prompt, ids = self._render(question, answer, plain=plain, history=turns, context=kept)
            if len(ids) <= budget:
                best, high = (kept, prompt, ids), drop - 1
            else:
                low = drop + 1
        if best is None:
            prompt, ids = self._render(question, answer, plain=plain, history=turns)
            return (), prompt, ids
        return best

    def _holds_special(self, *texts: str) -> bool:
        """Whether the pair (or its history) holds special-token strings of a tokenizer this side can encode with."""
        tokenizer = getattr(self.engine, "tokenizer", None)
        return tokenizer is not None and holds_special(tokenizer, texts)

    def _encode_answer(self, answer: str, plain: bool) -> list[int]:
        if plain:
            return self.engine.encode(answer, add_special_tokens=False, split_special_tokens=True)
        return self.engine.encode(answer, add_special_tokens=False)

    def _render(
        self, question: str, answer: str, *, plain: bool = False, history: History = (), context: Context = ()
    ) -> tuple[str, list[int]]:
        """The prompt and its tokens (a chat template left to a server is counted by the server).

        With ``plain``, the user's texts (question, answer, history, context) are encoded as plain text
        (see ``plaintext``).
        """
        if isinstance(self.template, ChatTemplate) and self.template.tokenizer is None:
            encode_messages = getattr(self.engine, "encode_messages", None)
            if encode_messages is None:
                raise TemplateError(f"the {self.engine.name!r} engine cannot render the chat template without a tokenizer")
            messages = self.template.messages(question=question, answer=answer, history=history, context=context)
            return "", encode_messages(messages)
        prompt = render_prompt(self.template, question, answer, history, context)
        special = self.template.add_special_tokens
        if plain:
            texts = (question, answer, *history_texts(history), *context_texts(context))
            ids = encode_plain(self.engine.encode, prompt, texts, add_special_tokens=special)
            if ids is None:
                raise InvalidInputError(
                    f"the {self.template.name!r} template rewrote the question or answer, so its special-token text "
                    "cannot be kept as plain text: remove the special-token strings from the text"
                )
            return prompt, ids
        return prompt, self.engine.encode(prompt, add_special_tokens=special)

    def _remote_request(
        self, question: str, answer: str, limit: int, history: History = (), context: Context = ()
    ) -> GenerationRequest:
        """A request for an engine that tokenizes on its side: the exact prompt, or chat messages
        when the model's chat template is left to the server."""
        template = self.template
        if isinstance(template, ChatTemplate) and template.tokenizer is None:
            messages = template.messages(question=question, answer=answer, history=history, context=context)
            return GenerationRequest(prompt="", prompt_ids=(), max_new_tokens=limit, reserve=limit,
                                     messages=tuple(messages))
        prompt = render_prompt(template, question, answer, history, context)
        return GenerationRequest(prompt=prompt, prompt_ids=(), max_new_tokens=limit, reserve=limit,
                                 add_special_tokens=template.add_special_tokens)

    def build(self, prepared: _Prepared, out: GenerationOutput, *, latency: float | None = None) -> Correction:
        """Turn a backend output into the public ``Correction``."""
        return Correction.build(
            question=prepared.question,
            original=prepared.answer,
            text=out.text,
            prompt_tokens=out.prompt_tokens if out.prompt_tokens is not None else len(prepared.request.prompt_ids),
            completion_tokens=out.completion_tokens,
            finish_reason=out.finish_reason,
            latency_s=out.latency_s if latency is None else latency,
            metadata={**prepared.metadata, **out.metadata},
        )


def choose_template(source: Any, tokenizer: Any, *, adapter: Any = None) -> str:
    """The template a loaded model expects: recorded in its directory, official, or its chat template."""
    from .loading import is_official_checkpoint, read_recorded_template

    dirs = [adapter, source.location if source.kind == "dir" else None]
    recorded = read_recorded_template(*dirs)
    if recorded is not None:
        template, why = recorded, "recorded in the model directory"
    elif is_official_checkpoint(source):
        template, why = "aligner-v1", "official Aligner checkpoint"
    elif getattr(tokenizer, "chat_template", None):
        template, why = "chat", "the tokenizer has a chat template (untrained corrector)"
    else:
        raise TemplateError(
            f"cannot tell which prompt template {source.name!r} expects: pass template='aligner-v1', "
            "'aligner-general', 'chat' or your own"
        )
    logger.info("template %r chosen for %s: %s", template, source.name, why)
    return template


def _resolve(template: str | Template) -> Template:
    return get_template(template) if isinstance(template, str) else template


def _bind(template: str | Template, tokenizer: Any) -> Template:
    """Look a template up and bind a chat template to ``tokenizer``."""
    if isinstance(template, str):
        return get_template(template, tokenizer=tokenizer)
    if isinstance(template, ChatTemplate) and template.tokenizer is None:
        return template.bind(tokenizer)
    return template


def _unpack(pair: Any, index: int) -> tuple[Any, Any, Any, Any]:
    """``(question, answer, history, context)`` of a batch item: a dict (``history``/``chat_history`` and ``context``
    keys optional) or a ``(question, answer)`` / ``(question, answer, history)`` tuple."""
    if isinstance(pair, Mapping):
        if "question" not in pair or "answer" not in pair:
            raise InvalidInputError(f"pair {index}: a dict pair needs 'question' and 'answer' keys, got {sorted(pair)}")
        return pair["question"], pair["answer"], history_of(pair), context_of(pair)
    if isinstance(pair, (tuple, list)) and len(pair) in (2, 3):
        return pair[0], pair[1], history_of({"history": pair[2]}) if len(pair) == 3 else None, None
    raise InvalidInputError(f"pair {index}: expected a (question, answer) tuple or a dict, got {type(pair).__name__}")


def _scored(prepared: _Prepared) -> Any:
    """What the inspector scores for a prepared pair: the pair, with its grounding context when it has one."""
    if not prepared.context:
        return (prepared.question, prepared.answer)
    return {"question": prepared.question, "answer": prepared.answer, "context": [c.to_dict() for c in prepared.context]}


def _gating(inspector: Any, threshold: Any) -> tuple[Any, float]:
    """``(Inspector or None, threshold)``, checked: a callable becomes an ``Inspector``; the threshold is in [0, 1]."""
    from .inspector import as_inspector, check_threshold

    return (None if inspector is None else as_inspector(inspector)), check_threshold(threshold)


def _subset(limits: int | Sequence[int] | None, indices: Sequence[int], n: int) -> int | list[int] | None:
    """Per-pair ``max_new_tokens`` of the pairs at ``indices`` of ``n`` (one int or None applies to all)."""
    if limits is None or isinstance(limits, (int, str, bytes)) or not isinstance(limits, Sequence):
        return limits  # type: ignore[return-value]
    if len(limits) != n:
        raise InvalidInputError(f"max_new_tokens has {len(limits)} entries for {n} pairs")
    return [limits[i] for i in indices]


def _per_item_limits(value: int | Sequence[int] | None, n: int, default: int) -> list[int]:
    if value is None:
        return [default] * n
    if isinstance(value, int) and not isinstance(value, bool):
        items = [value] * n
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = list(value)
        if len(items) != n:
            raise InvalidInputError(f"max_new_tokens has {len(items)} entries for {n} pairs")
    else:
        raise GenerationOptionError(f"max_new_tokens must be an integer >= 1 or one per pair, got {value!r}")
    for v in items:
        GenerationParams(max_new_tokens=v)  # validates
    return items


def _check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise GenerationOptionError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)


def _check_text(where: str, field_name: str, value: str) -> None:
    """Text must be valid Unicode: a lone surrogate (a broken ``\\ud800`` escape) cannot be encoded."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{where}{field_name} holds a lone surrogate {value[exc.start]!r} at character {exc.start}: it is not "
            "valid Unicode text (a broken \\uD800-\\uDFFF escape in the input?)"
        ) from None


_WARNED_MARKERS: set[str] = set()


def _template_markers_in(template: Any, *texts: str) -> list[str]:
    """The template's own separators found inside the user's text (the official formats cannot escape them)."""
    markers = getattr(template, "markers", ())
    found = sorted({m for m in markers for text in texts if m in text})
    if found and template.name not in _WARNED_MARKERS:
        _WARNED_MARKERS.add(template.name)
        logger.warning(
            "the text holds the %r template's own separators %s: the format cannot escape them, so the prompt is "
            "ambiguous for the model (kept as is; recorded in Correction.metadata['template_markers_in_text'])",
            template.name, found,
        )
    return found


def _deliver(ref: weakref.ref[Any], delta: str) -> None:
    """Hand a delta to its stream; a stream nobody holds any more stops the generation."""
    stream = ref()
    if stream is None:
        raise StreamCancelled
    stream.put(delta)


def _takes_progress(engine: Engine) -> bool:
    """Whether ``engine.generate`` accepts ``progress=`` (engines written before it do not)."""
    import inspect

    try:
        parameters = inspect.signature(engine.generate).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin or C callable
        return False
    return "progress" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
