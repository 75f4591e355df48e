"""The local transformers engine: the library's own decoding loop in the caller's process.

Padded, length-bucketed batches planned under a token budget, out-of-memory splitting,
answer-anchored drafting (``speculative.py``) and a micro-batching worker (``scheduler.py``) that
lets concurrent ``submit``/``agenerate`` callers share batches.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import torch

from ...errors import AlignerOutOfMemoryError
from ...plaintext import encode_text
from ...progress import Progress
from ..base import GenerationOutput, GenerationParams, GenerationRequest, ResultCallback, TextSink
from .hf_generate import generate_tokens, sink_streamer
from .planner import plan_batches
from .progress import BatchReport, counting_streamer

logger = logging.getLogger("aligner_core")


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/MPS/CPU allocator out-of-memory errors."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids


class TransformersEngine:
    """Runs a transformers causal LM on batches of prompts planned under a token budget.

    One model, one user at a time: ``lock`` is held while the model runs (take it to share the
    loaded model, e.g. as an upstream chat model). Concurrent single requests are gathered into
    shared batches by a background worker started on first use.
    """

    name = "transformers"
    tokenizes_locally = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_tokens: int | None = None,
        max_batch_size: int | None = None,
        max_verify_tokens: int | None = None,
        max_wait_ms: float = 5.0,
        max_queue: int = 4096,
    ):
        if max_batch_tokens is None:  # CPU: a fixed budget; CUDA/MPS: what the card holds (see memory_budget)
            from .memory_budget import ACCELERATOR_MAX_ROWS, budget_for

            max_batch_tokens = budget_for(model)
            if max_batch_size is None and next(model.parameters()).device.type != "cpu":
                max_batch_size = ACCELERATOR_MAX_ROWS  # the activation reserve covers this many rows' logits
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be a positive integer, got {max_batch_tokens}")
        from .scheduler import MicroBatcher

        self.lock = threading.Lock()
        self.scheduler = MicroBatcher(
            self._generate,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            max_batch_tokens=max_batch_tokens,
            max_batch_size=max_batch_size,
            lock=self.lock,
        )
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.eos_token_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        if pad is None:
            # Fallback: pad with EOS (masked out anyway), else token 0.
            pad = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.pad_token_id = int(pad)
        self.context_length: int | None = _context_length(model, tokenizer)
        if max_verify_tokens is None:
            # Tokens one drafted decoding step may verify (rows x width): a CPU turns compute-bound
            # after a few tokens per step, a GPU only after hundreds (see docs/performance.md).
            max_verify_tokens = 16 if self.device.type == "cpu" else 256
        self.max_verify_tokens = max_verify_tokens
        from .speculative import DraftingPolicy

        self.drafting_policy = DraftingPolicy(self.device.type, max_verify_tokens=max_verify_tokens)
        if self.device.type == "cpu":
            from .threads import configure_cpu_threads

            configure_cpu_threads()  # physical cores this process may use, unless the user chose
        self.loop_supported = True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str, *, add_special_tokens: bool, split_special_tokens: bool = False) -> list[int]:
        return encode_text(
            self.tokenizer,
            text,
            add_special_tokens=add_special_tokens,
            split_special_tokens=split_special_tokens,
        )

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    # -- the Engine entry points --------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: GenerationParams,
        *,
        fail_fast: bool = True,
        on_result: ResultCallback | None = None,
        progress: Progress | None = None,
    ) -> list[GenerationOutput | BaseException]:
        """Complete a batch in planned sub-batches, holding the model for the whole call.

        ``progress`` gets tokens every decoding step and each row once it hits EOS or its limit.
        """
        if self.scheduler.closed:
            from .scheduler import SchedulerClosedError

            raise SchedulerClosedError("this Aligner is closed: create a new one to correct more answers")
        with self.lock:
            return self._generate(
                requests, params, fail_fast=fail_fast, on_result=on_result, progress=progress
            )

    def submit(self, request: GenerationRequest, params: GenerationParams) -> Future[GenerationOutput]:
        from .scheduler import Ticket

        return self.scheduler.submit(Ticket(params, request))

    async def agenerate(self, request: GenerationRequest, params: GenerationParams) -> GenerationOutput:
        from .scheduler import Ticket

        return await self._submit_async(Ticket(params, request))

    def stream(
        self, request: GenerationRequest, params: GenerationParams, on_text: TextSink
    ) -> Future[GenerationOutput]:
        from .scheduler import Ticket

        return self.scheduler.submit(
            Ticket(None, request, exclusive=lambda: self._stream_text(request, params, on_text))
        )

    async def astream(
        self, request: GenerationRequest, params: GenerationParams, on_text: TextSink
    ) -> GenerationOutput:
        from .scheduler import Ticket

        return await self._submit_async(
            Ticket(None, request, exclusive=lambda: self._stream_text(request, params, on_text))
        )

    def close(self) -> None:
        """Stop the background worker (pending requests fail with ``SchedulerClosedError``)."""
        self.scheduler.close()

    async def _submit_async(self, job: Any) -> GenerationOutput:
        """Queue a job from a coroutine; when the queue is full, wait for room without blocking the loop."""
        try:
            future = self.scheduler.submit(job, block=False)
        except queue.Full:
            future = await asyncio.to_thread(self.scheduler.submit, job)
        return await asyncio.wrap_future(future)

    def _stream_text(
        self, request: GenerationRequest, params: GenerationParams, on_text: TextSink
    ) -> GenerationOutput:
        eos = set(self.eos_token_ids)
        tokens: list[int] = []

        def sink(new: list[int]) -> None:
            tokens.extend(t for t in new if t not in eos)
            text = self.decode(tokens)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                on_text(text)

        return self.generate_stream(request, params, sink)

    # -- generation --------------------------------------------------------------------------

    def _generate(
        self,
        requests: Sequence[GenerationRequest],
        params: GenerationParams,
        *,
        fail_fast: bool = True,
        on_result: ResultCallback | None = None,
        progress: Progress | None = None,
    ) -> list[GenerationOutput | BaseException]:
        results: list[GenerationOutput | BaseException | None] = [None] * len(requests)
        batches = plan_batches(
            [len(r.prompt_ids) for r in requests],
            [r.reserve for r in requests],
            self.max_batch_tokens,
            max_batch_size=self.max_batch_size,
        )
        if params.seed is not None:
            torch.manual_seed(params.seed)
        for batch in batches:
            try:
                outputs: list[GenerationOutput | BaseException] = list(
                    self._run_splitting([requests[i] for i in batch], params, progress)
                )
            except Exception as exc:
                if fail_fast:
                    raise
                outputs = self._isolate([requests[i] for i in batch], params, exc, progress)
            for i, out in zip(batch, outputs):
                results[i] = out
                if progress is not None and isinstance(out, BaseException):
                    progress.update(rows=1)  # a failed row is complete too
                if on_result is not None:
                    on_result(i, out)
        return results  # type: ignore[return-value]

    def _isolate(
        self,
        batch: list[GenerationRequest],
        params: GenerationParams,
        exc: Exception,
        progress: Progress | None = None,
    ) -> list[GenerationOutput | BaseException]:
        """After a batch failed, run its requests one by one so only the culprit fails."""
        if len(batch) == 1:
            return [exc]
        logger.warning("a batch of %d failed (%s); retrying its requests one by one", len(batch), exc)
        results: list[GenerationOutput | BaseException] = []
        for request in batch:
            try:
                results.extend(self._run_splitting([request], params, progress))
            except Exception as single:
                results.append(single)
        return results

    def generate_stream(
        self, request: GenerationRequest, params: GenerationParams, sink: Callable[[list[int]], None]
    ) -> GenerationOutput:
        """Generate one request, handing each new token to ``sink`` as it is produced."""
        if params.drafting and self.loop_supported and request.draft_ids:
            return self._run_drafted([request], params, sink=lambda _row, tokens: sink(tokens))[0]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        start = time.perf_counter()
        tokens = generate_tokens(self, [request], params, sink_streamer(sink))[0]
        return self.finish(tokens, request.max_new_tokens, params.stop, time.perf_counter() - start)

    def _run_splitting(
        self, batch: list[GenerationRequest], params: GenerationParams, progress: Progress | None = None
    ) -> list[GenerationOutput]:
        """Run a batch; on out-of-memory free the cache, halve it and retry each half."""
        try:
            return self._run_batch(batch, params, progress)
        except Exception as exc:
            if not is_oom(exc):
                raise
            _free_cache()
            if len(batch) == 1:
                raise AlignerOutOfMemoryError(
                    f"out of memory on a single request of {len(batch[0].prompt_ids)} prompt tokens and up to "
                    f"{batch[0].max_new_tokens} new tokens: lower max_new_tokens, use a smaller dtype or "
                    "quantization, or free accelerator memory"
                ) from exc
            half = len(batch) // 2
            logger.warning(
                "out of memory on a batch of %d; retrying as %d + %d", len(batch), half, len(batch) - half
            )
            return self._run_splitting(batch[:half], params, progress) + self._run_splitting(
                batch[half:], params, progress
            )

    def _run_drafted(
        self,
        batch: list[GenerationRequest],
        params: GenerationParams,
        sink: Callable[[int, list[int]], None] | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[GenerationOutput]:
        """Greedy decoding with answer-anchored drafts (see ``speculative.py``)."""
        from .speculative import drafted_greedy

        start = time.perf_counter()
        stop_check = None
        if params.stop:
            longest = max(len(s) for s in params.stop)

            def stop_check(_row: int, tokens: list[int]) -> bool:
                tail = self.decode(tokens[-(longest + 8) :])
                return any(s in tail for s in params.stop)

        rows = drafted_greedy(
            self.model,
            [r.prompt_ids for r in batch],
            [r.draft_ids for r in batch],
            [r.max_new_tokens for r in batch],
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            num_draft_tokens=params.num_draft_tokens,
            max_verify_tokens=self.max_verify_tokens,
            stop_check=stop_check,
            sink=sink,
            on_step=on_step,
        )
        latency = time.perf_counter() - start
        outputs = []
        for row, r in zip(rows, batch):
            out = self.finish(row.tokens, r.max_new_tokens, params.stop, latency)
            rate = row.accepted / row.proposed if row.proposed else 0.0
            meta = {
                "speculative": True,
                "draft_tokens": row.proposed,
                "accepted_draft_tokens": row.accepted,
                "acceptance_rate": round(rate, 4),
                "decode_steps": row.steps,
            }
            outputs.append(replace(out, metadata=meta))
        return outputs

    def _run_batch(
        self, batch: list[GenerationRequest], params: GenerationParams, progress: Progress | None = None
    ) -> list[GenerationOutput]:
        """Run one planned batch, reporting its progress live and settling it exactly once it is done."""
        if progress is None:
            return self._decode_batch(batch, params, None)
        report = BatchReport(progress)
        try:
            outputs = self._decode_batch(batch, params, report)
        except BaseException:
            report.retract()  # an out-of-memory retry or a one-by-one rerun generates these rows again
            raise
        report.settle(outputs)
        return outputs

    def _decode_batch(
        self, batch: list[GenerationRequest], params: GenerationParams, report: BatchReport | None
    ) -> list[GenerationOutput]:
        on_step = report.step if report is not None else None
        drafting = params.drafting and self.loop_supported and any(r.draft_ids for r in batch)
        if drafting and self.drafting_policy.choose(len(batch)):
            try:
                outputs = self._run_drafted(batch, params, on_step=on_step)
                self.drafting_policy.record(
                    sum(o.metadata.get("draft_tokens", 0) for o in outputs),
                    sum(o.metadata.get("accepted_draft_tokens", 0) for o in outputs),
                )
                return outputs
            except TypeError as exc:  # a model whose forward lacks position_ids / logits_to_keep / cache
                logger.warning("the drafting loop does not support this model (%s); using generate()", exc)
                self.loop_supported = False
                if report is not None:
                    report.retract()
        start = time.perf_counter()
        streamer = None
        if report is not None:
            streamer = counting_streamer([r.max_new_tokens for r in batch], self.eos_token_ids, report.step)
        new_tokens = generate_tokens(self, batch, params, streamer)
        latency = time.perf_counter() - start
        return [
            self.finish(tokens, r.max_new_tokens, params.stop, latency)
            for tokens, r in zip(new_tokens, batch)
        ]

    def finish(
        self, tokens: list[int], max_new_tokens: int, stop: Sequence[str], latency: float
    ) -> GenerationOutput:
        """Cut generated tokens at EOS, the request's own limit, or a stop string."""
        tokens = tokens[:max_new_tokens]
        finish = "length"
        for pos, tok in enumerate(tokens):
            if tok in self.eos_token_ids:
                tokens, finish = tokens[: pos + 1], "stop"
                break
        body = tokens[:-1] if finish == "stop" else tokens
        text = self.decode(body)
        cut = min((p for p in (text.find(s) for s in stop) if p >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        return GenerationOutput(
            text=text.strip(), completion_tokens=len(tokens), finish_reason=finish, latency_s=latency
        )


def _free_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _context_length(model: Any, tokenizer: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**8:
        return limit
    return None
