"""The Aligner facade: validate, render, plan, generate, and return ``Correction`` objects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

from .backend import Backend, GenerationOutput, GenerationParams, GenerationRequest
from .correction import Correction
from .errors import (
    AlignerError,
    ContextOverflowError,
    EmptyAnswerError,
    InvalidInputError,
    TemplateError,
)
from .scheduler import Job, MicroBatcher
from .streaming import AsyncCorrectionStream, CorrectionStream, StreamCancelled, TextDeltas
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


class Aligner:
    """A corrector: reads a question and an upstream answer, writes a better answer.

    Build one with :meth:`from_pretrained` (loads a model) or :meth:`from_model` (wraps a model and
    tokenizer you already have); every entry point goes through the same backend.
    """

    def __init__(
        self,
        backend: Backend,
        template: Template,
        *,
        name: str = "",
        max_new_tokens: int = 1024,
        on_overflow: OverflowPolicy = "error",
        max_wait_ms: float = 5.0,
        max_queue: int = 4096,
    ) -> None:
        if on_overflow not in ("error", "truncate"):
            raise ValueError(f"on_overflow must be 'error' or 'truncate', got {on_overflow!r}")
        self.backend = backend
        self.template = template
        self.name = name
        self.on_overflow: OverflowPolicy = on_overflow
        self.defaults = GenerationParams(max_new_tokens=max_new_tokens)
        self._lock = threading.Lock()  # one model, one user at a time: the worker or a correct_batch call
        self.scheduler = MicroBatcher(
            backend,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            max_batch_tokens=getattr(backend, "max_batch_tokens", 16384),
            lock=self._lock,
        )

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str],
        *,
        template: str | Template | None = None,
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
        max_batch_tokens: int = 16384,
        on_overflow: OverflowPolicy = "error",
        max_wait_ms: float = 5.0,
    ) -> Aligner:
        """Load an Aligner from a hub id, a local directory or a GGUF file.

        ``template=None`` picks the template recorded in the model (or adapter) directory, then
        ``aligner-v1`` for the official ``aligner/aligner-*`` checkpoints, then ``chat`` when the
        tokenizer has a chat template. ``allow_pickle`` opts in to ``.bin`` weights.
        """
        from .loading import is_official_checkpoint, load_model, read_recorded_template

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
        return cls.from_model(
            loaded,
            tokenizer,
            template=template,
            name=source.name,
            max_new_tokens=max_new_tokens,
            max_batch_tokens=max_batch_tokens,
            on_overflow=on_overflow,
            max_wait_ms=max_wait_ms,
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
        max_batch_tokens: int = 16384,
        max_batch_size: int | None = None,
        on_overflow: OverflowPolicy = "error",
        max_wait_ms: float = 5.0,
        max_queue: int = 4096,
    ) -> Aligner:
        """Wrap a transformers model and tokenizer that are already loaded."""
        from .engine import TransformersBackend

        backend = TransformersBackend(model, tokenizer, max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size)
        if isinstance(template, str):
            template = get_template(template, tokenizer=tokenizer)
        elif isinstance(template, ChatTemplate) and template.tokenizer is None:
            template = template.bind(tokenizer)
        return cls(
            backend,
            template,
            name=name or str(getattr(model, "name_or_path", "")),
            max_new_tokens=max_new_tokens,
            on_overflow=on_overflow,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
        )

    def __repr__(self) -> str:
        return f"Aligner(name={self.name!r}, template={self.template.name!r})"

    @property
    def model_lock(self) -> threading.Lock:
        """Held while the model runs; take it to share the loaded model (e.g. as an upstream LLM)."""
        return self._lock

    # -- public API --------------------------------------------------------------------------

    def correct(self, question: str, answer: str, **generation: Any) -> Correction:
        """Correct one answer. Generation options (``max_new_tokens``, ``do_sample``, ``stop``, ...) apply to this call."""
        overflow = generation.pop("on_overflow", None)
        params = self.defaults.updated(generation)
        prepared = self.prepare(question, answer, params, on_overflow=overflow)
        start = time.perf_counter()
        out = self.scheduler.submit(Job(params, prepared.request)).result()
        return self.build(prepared, out, latency=time.perf_counter() - start)

    async def acorrect(self, question: str, answer: str, **generation: Any) -> Correction:
        """Async ``correct``: concurrent calls from many coroutines share GPU/CPU batches.

        The event loop is never blocked: the model runs in the worker thread and the result is
        handed back on this loop. Cancelling the awaiting task drops the request if it has not started.
        """
        overflow = generation.pop("on_overflow", None)
        params = self.defaults.updated(generation)
        prepared = self.prepare(question, answer, params, on_overflow=overflow)
        start = time.perf_counter()
        out = await self._submit_async(Job(params, prepared.request))
        return self.build(prepared, out, latency=time.perf_counter() - start)

    async def acorrect_batch(
        self,
        pairs: Sequence[Any],
        *,
        return_exceptions: bool = False,
        max_new_tokens: int | Sequence[int] | None = None,
        **generation: Any,
    ) -> list[Any]:
        """Async ``correct_batch``: all pairs go to the shared worker at once; input order is kept."""
        slots, params = self._prepare_all(pairs, return_exceptions, max_new_tokens, generation)
        start = time.perf_counter()

        async def one(slot: _Prepared | Exception) -> Correction:
            if isinstance(slot, Exception):
                raise slot
            out = await self._submit_async(Job(params, slot.request))
            return self.build(slot, out, latency=time.perf_counter() - start)

        return list(await asyncio.gather(*(one(s) for s in slots), return_exceptions=return_exceptions))

    async def _submit_async(self, job: Job) -> GenerationOutput:
        try:
            future = self.scheduler.submit(job, block=False)
        except queue.Full:  # backpressure: wait for room without blocking the event loop
            future = await asyncio.to_thread(self.scheduler.submit, job)
        return await asyncio.wrap_future(future)

    def stream(self, question: str, answer: str, **generation: Any) -> CorrectionStream:
        """Yield the correction as text deltas while it is generated.

        The deltas concatenate to exactly ``Correction.text``; the stream's ``correction``
        attribute holds the full ``Correction`` once the iterator is exhausted. ``close()`` stops
        generation early.
        """
        stream = CorrectionStream()
        self.scheduler.submit(self._stream_job(stream, question, answer, generation))
        return stream

    def astream(self, question: str, answer: str, **generation: Any) -> AsyncCorrectionStream:
        """Async twin of :meth:`stream`: ``async for delta in aligner.astream(q, a)``."""
        stream = AsyncCorrectionStream(asyncio.get_running_loop())
        job = self._stream_job(stream, question, answer, generation)
        try:
            self.scheduler.submit(job, block=False)
        except queue.Full:  # backpressure: queue it from a thread on first read, never blocking the loop
            stream._started = lambda: asyncio.to_thread(self.scheduler.submit, job)
        return stream

    def _stream_job(self, stream: Any, question: str, answer: str, generation: dict[str, Any]) -> Job:
        overflow = generation.pop("on_overflow", None)
        params = self.defaults.updated(generation)
        prepared = self.prepare(question, answer, params, on_overflow=overflow)
        deltas = TextDeltas(self.backend.decode, params.stop)
        eos = set(getattr(self.backend, "eos_token_ids", ()))

        def run() -> GenerationOutput:
            start = time.perf_counter()
            try:
                out = self.backend.generate_stream(  # type: ignore[attr-defined]
                    prepared.request, params, lambda toks: stream.put(deltas.push([t for t in toks if t not in eos]))
                )
            except StreamCancelled:
                stream.done(None)
                raise
            except BaseException as exc:
                stream.done(None, exc)
                raise
            correction = self.build(prepared, out, latency=time.perf_counter() - start)
            with contextlib.suppress(StreamCancelled):
                stream.put(deltas.finish(correction.text))
            stream.done(correction)
            return out

        return Job(None, prepared.request, exclusive=run)

    def close(self) -> None:
        """Stop the background worker (pending requests fail with ``SchedulerClosedError``)."""
        self.scheduler.close()

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
        return_exceptions: Literal[True],
        max_new_tokens: int | Sequence[int] | None = ...,
        **generation: Any,
    ) -> list[Correction | Exception]: ...

    def correct_batch(
        self,
        pairs: Sequence[Any],
        *,
        show_progress: bool = False,
        return_exceptions: bool = False,
        max_new_tokens: int | Sequence[int] | None = None,
        **generation: Any,
    ) -> list[Correction] | list[Correction | Exception]:
        """Correct many ``(question, answer)`` pairs (tuples or dicts) in planned batches; input order is kept.

        ``max_new_tokens`` may be one int or one per pair. With ``return_exceptions=True`` a bad
        pair yields its exception in its place and the others are still corrected, as in
        ``asyncio.gather``; otherwise all input is validated before any compute and the first
        problem is raised.
        """
        from tqdm.auto import tqdm

        slots, params = self._prepare_all(pairs, return_exceptions, max_new_tokens, generation)
        live = [i for i, s in enumerate(slots) if isinstance(s, _Prepared)]
        results: list[Correction | Exception] = [s for s in slots]  # type: ignore[misc]
        with tqdm(total=len(pairs), desc="Correcting", unit="pair", disable=not show_progress) as bar:
            bar.update(len(pairs) - len(live))
            with self._lock:
                outputs = self.backend.generate(
                    [slots[i].request for i in live],  # type: ignore[union-attr]
                    params,
                    fail_fast=not return_exceptions,
                    on_result=lambda _j, _out: bar.update(1),
                )
        for i, out in zip(live, outputs):
            prepared = slots[i]
            assert isinstance(prepared, _Prepared)
            results[i] = out if isinstance(out, BaseException) else self.build(prepared, out)  # type: ignore[assignment]
        return results

    # -- the shared path ---------------------------------------------------------------------

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
                q, a = _unpack(pair, i)
                slots.append(self.prepare(q, a, params, on_overflow=overflow, max_new_tokens=limit, index=i))
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
    ) -> _Prepared:
        """Validate a pair and turn it into a generation request (raises specific errors)."""
        where = "" if index is None else f"pair {index}: "
        for field_name, value in (("question", question), ("answer", answer)):
            if not isinstance(value, str):
                raise InvalidInputError(f"{where}{field_name} must be a str, got {type(value).__name__}")
        if not answer.strip():
            raise EmptyAnswerError(f"{where}the answer is empty or whitespace: there is nothing to correct")
        policy = on_overflow or self.on_overflow
        if policy not in ("error", "truncate"):
            raise ValueError(f"on_overflow must be 'error' or 'truncate', got {policy!r}")
        limit = max_new_tokens or params.max_new_tokens
        special = self.template.add_special_tokens
        prompt = self.template.format(question=question, answer=answer)
        ids = self.backend.encode(prompt, add_special_tokens=special)
        answer_ids = self.backend.encode(answer, add_special_tokens=False)
        metadata: dict[str, Any] = {"template": self.template.name}
        ctx = self.backend.context_length
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
            cut = self.backend.decode(answer_ids[:keep])
            prompt = self.template.format(question=question, answer=cut)
            ids = self.backend.encode(prompt, add_special_tokens=special)
            while len(ids) + limit > ctx and keep > 1:  # re-tokenizing at the seam can add a token
                keep -= 1
                prompt = self.template.format(question=question, answer=self.backend.decode(answer_ids[:keep]))
                ids = self.backend.encode(prompt, add_special_tokens=special)
            metadata.update(truncated=True, answer_tokens_kept=keep, answer_tokens=len(answer_ids))
        reserve = min(limit, max(RESERVE_MIN, RESERVE_FACTOR * len(answer_ids)))
        if metadata.get("truncated"):
            answer_ids = answer_ids[: metadata["answer_tokens_kept"]]
        request = GenerationRequest(
            prompt=prompt, prompt_ids=tuple(ids), max_new_tokens=limit, reserve=reserve, draft_ids=tuple(answer_ids)
        )
        return _Prepared(question=question, answer=answer, request=request, metadata=metadata)

    def build(self, prepared: _Prepared, out: GenerationOutput, *, latency: float | None = None) -> Correction:
        """Turn a backend output into the public ``Correction``."""
        return Correction.build(
            question=prepared.question,
            original=prepared.answer,
            text=out.text,
            prompt_tokens=len(prepared.request.prompt_ids),
            completion_tokens=out.completion_tokens,
            finish_reason=out.finish_reason,
            latency_s=out.latency_s if latency is None else latency,
            metadata={**prepared.metadata, **out.metadata},
        )


def _unpack(pair: Any, index: int) -> tuple[Any, Any]:
    if isinstance(pair, Mapping):
        if "question" not in pair or "answer" not in pair:
            raise InvalidInputError(f"pair {index}: a dict pair needs 'question' and 'answer' keys, got {sorted(pair)}")
        return pair["question"], pair["answer"]
    if isinstance(pair, (tuple, list)) and len(pair) == 2:
        return pair[0], pair[1]
    raise InvalidInputError(f"pair {index}: expected a (question, answer) tuple or a dict, got {type(pair).__name__}")


def _per_item_limits(value: int | Sequence[int] | None, n: int, default: int) -> list[int]:
    if value is None:
        return [default] * n
    if isinstance(value, int) and not isinstance(value, bool):
        items = [value] * n
    else:
        items = list(value)
        if len(items) != n:
            raise InvalidInputError(f"max_new_tokens has {len(items)} entries for {n} pairs")
    for v in items:
        GenerationParams(max_new_tokens=v)  # validates
    return items
