"""The Aligner facade: build a corrector, check each call's arguments, and hand the work on.

What each step does lives beside the step: request building and context fitting in ``requests``, the
inspector gate in ``gating``, stream plumbing in ``streaming``, template choice in ``templates``, progress in
``progress``, spans in ``telemetry``; engines in ``engines``. Every entry point goes through the same path.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload

from . import gating, requests, streaming, telemetry
from .correction import Correction
from .engines.base import Engine, GenerationOutput, GenerationParams
from .gating import OWN
from .items import as_sequence
from .progress import Progress, ProgressCallback, batch_tracker, generate_tracked
from .requests import ContextArg, HistoryArg, OverflowPolicy, PreparedRequest
from .streaming import AsyncCorrectionStream, CorrectionStream
from .telemetry import span_of
from .templates import Template, bind, choose_template


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
        self.inspector, self.threshold = gating.checked(inspector, threshold)

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
        from .engines.opening import open_pretrained

        opened, chosen, name = open_pretrained(
            model,
            template=template,
            engine=engine,
            dtype=dtype,
            device=device,
            device_map=device_map,
            gguf_file=gguf_file,
            adapter=adapter,
            quantization=quantization,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            revision=revision,
            max_batch_tokens=max_batch_tokens,
            max_wait_ms=max_wait_ms,
            engine_kwargs=engine_kwargs,
        )
        return cls(
            opened,
            chosen,
            name=name,
            max_new_tokens=max_new_tokens,
            on_overflow=on_overflow,
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
        from .engines.opening import open_local

        engine = open_local(
            model,
            tokenizer,
            max_batch_tokens=max_batch_tokens,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
        )
        return cls(
            engine,
            bind(template, tokenizer),
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
        from .engines.opening import open_server

        engine, chosen = open_server(
            base_url,
            template=template,
            model=model,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_concurrency=max_concurrency,
            tokenizer=tokenizer,
            extra_body=extra_body,
        )
        return cls(
            engine,
            chosen,
            name=engine.model_name or base_url,
            max_new_tokens=max_new_tokens,
            on_overflow=on_overflow,
            inspector=inspector,
            threshold=threshold,
        )

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
                if tracker is not None and passed:
                    tracker.update(rows=passed)  # answers the inspector passed are done: no generation
                slots, params = requests.prepare_all(
                    self, subset, return_exceptions, limits, dict(generation)
                )
                live = [i for i, s in enumerate(slots) if isinstance(s, PreparedRequest)]
                if tracker is not None:
                    tracker.update(rows=len(subset) - len(live))  # pairs refused before any compute
                outputs = generate_tracked(
                    self.engine,
                    [slots[i].request for i in live],
                    params,  # type: ignore[union-attr]
                    fail_fast=not return_exceptions,
                    progress=tracker,
                )
                results: list[Any] = list(slots)
                for i, out in zip(live, outputs):
                    results[i] = out if isinstance(out, BaseException) else self.build(slots[i], out)  # type: ignore[arg-type]
                return results

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
            slots, params = requests.prepare_all(self, subset, return_exceptions, limits, dict(generation))
            start = time.perf_counter()

            async def one(slot: PreparedRequest | Exception) -> Correction:
                if isinstance(slot, Exception):
                    raise slot
                out = await self.engine.agenerate(slot.request, params)
                return self.build(slot, out, latency=time.perf_counter() - start)

            return list(await asyncio.gather(*(one(s) for s in slots), return_exceptions=return_exceptions))

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
