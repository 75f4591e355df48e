"""The decoding worker: one thread owns the llama.cpp context and batches every request continuously.

llama.cpp contexts are not thread-safe, so every caller (``generate``, ``submit``, ``agenerate``, streams) only
puts a :class:`Job` on a queue; this thread admits jobs into free sequence slots, and each step builds **one**
``llama_decode`` holding, for every admitted sequence, its pending token (plus its draft from the answer, when
drafting pays) and chunks of the prompts still being read. A sequence that finishes leaves at once and a waiting
job takes its slot at the next step (continuous batching), so 32 concurrent requests share every decode instead
of waiting in line. Greedy picks are one ``argmax`` over the step's logits; sampling and penalties are done in
numpy per sequence.

A failure stays with its request: a stream whose reader went away, a cancelled future or a bad option ends only
that sequence (its KV cells are freed); a decode that llama.cpp refuses fails the sequences in it.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import AlignerOutOfMemoryError, ContextOverflowError, EngineClosedError, EngineUnavailableError
from ..base import GenerationOutput
from .drafting import CostModel, DraftPlanner
from .sequences import Job, Running, Stats

if TYPE_CHECKING:
    from .native import NativeModel
    from .threads import ThreadTuner

logger = logging.getLogger("aligner_core.llamacpp")

_STOP = object()


class Worker:
    """The thread that owns a :class:`NativeModel` and runs every job on it (see the module docstring)."""

    def __init__(
        self,
        native: NativeModel,
        *,
        eos_token_ids: Sequence[int],
        decode: Callable[[Sequence[int]], str],
        context_length: int,
        capacity: int | None,
        max_draft_tokens: int,
        max_queue: int,
        cost: CostModel,
        calibrate: bool = False,
        tuner: ThreadTuner | None = None,
    ) -> None:
        """``capacity``: KV cells all sequences share (a unified cache), None when each slot has its own;
        ``calibrate``: time a few decodes first to seed the drafting cost model; ``tuner``: picks the thread
        count as the machine's load changes."""
        self.native = native
        self.eos = set(int(t) for t in eos_token_ids)
        self.decode = decode
        self.context_length = context_length
        self.capacity = capacity
        self.max_draft = max_draft_tokens
        self.cost = cost
        self.planner = DraftPlanner(cost)
        self.stats = Stats()
        self.inbox: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Running] = []
        self.free = list(range(native.n_seq_max - 1, -1, -1))
        self.reserved = 0
        self.closed = False
        self._calibrate = calibrate
        self.tuner = tuner
        self._eog_cache: dict[int, bool] = {}
        self.thread = threading.Thread(target=self._run, name="aligner-llamacpp", daemon=True)
        self.thread.start()

    # -- callers ------------------------------------------------------------------------------

    def submit(self, job: Job, *, block: bool = True) -> Future[GenerationOutput]:
        """Queue a job (blocks while ``max_queue`` items wait, unless ``block=False``: then ``queue.Full``)."""
        if self.closed:
            raise EngineClosedError("this Aligner's llama.cpp engine is closed: create a new one")
        self.inbox.put(job, block=block)
        return job.future

    def submit_many(self, jobs: list[Job]) -> list[Future[GenerationOutput]]:
        """Queue a batch as one item, so the worker admits it together and in order: the same batch always
        meets the same companions in each decode (llama.cpp's arithmetic depends a little on them)."""
        if self.closed:
            raise EngineClosedError("this Aligner's llama.cpp engine is closed: create a new one")
        self.inbox.put(list(jobs))
        return [job.future for job in jobs]

    def close(self, timeout: float = 30.0) -> None:
        """Fail queued and running jobs with ``EngineClosedError``, stop the thread and free the model."""
        if self.closed:
            return
        self.closed = True
        self.inbox.put(_STOP)
        self.thread.join(timeout)

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        try:
            if self._calibrate:
                self._calibrate_cost()
            while not stopping:
                if not self.active and not self.waiting:
                    item = self.inbox.get()
                    if item is _STOP:
                        break
                    self._enqueue(item)
                stopping = self._drain_inbox()
                if stopping:
                    break
                self._drop_cancelled()
                self._admit()
                if self.active:
                    self._step()
        except BaseException as exc:  # never leave a future waiting forever
            logger.exception("the llama.cpp worker failed")
            self._fail_all(
                EngineUnavailableError(
                    f"the llama.cpp worker failed ({type(exc).__name__}: {exc}): "
                    "close this Aligner and create a new one"
                )
            )
        finally:
            self.closed = True
            self._fail_all(EngineClosedError("the Aligner was closed before this request finished"))
            self.native.close()

    def _drain_inbox(self) -> bool:
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            self._enqueue(item)

    def _enqueue(self, item: Job | list[Job]) -> None:
        if isinstance(item, list):
            self.waiting.extend(item)
        else:
            self.waiting.append(item)

    def _fail_all(self, error: BaseException) -> None:
        for seq in self.active:
            self._settle(seq.job, error=error)
        self.active = []
        while self.waiting:
            self._settle(self.waiting.popleft(), error=error)
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            for job in item if isinstance(item, list) else [item]:
                if job is not _STOP:
                    self._settle(job, error=error)

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.active if s.job.future.cancelled()]:
            self._release(seq)

    def _admit(self) -> None:
        """Move waiting jobs into free slots, first come first served, while the KV cache can hold them."""
        while self.waiting and self.free:
            job = self.waiting[0]
            if job.future.cancelled():
                self.waiting.popleft()
                continue
            need = len(job.prompt) + job.request.max_new_tokens
            if need > self.context_length:
                self.waiting.popleft()
                self._settle(
                    job,
                    error=ContextOverflowError(
                        f"the prompt is {len(job.prompt)} tokens and max_new_tokens is {job.request.max_new_tokens}, more "
                        f"than the llama.cpp engine's context of {self.context_length} tokens per sequence: shorten the "
                        "answer, lower max_new_tokens, pass on_overflow='truncate', or load with a larger n_ctx"
                    ),
                )
                continue
            if self.capacity is not None and self.reserved + need > self.capacity and self.active:
                return  # wait for running sequences to leave
            self.waiting.popleft()
            self.reserved += need
            self.active.append(Running(job, self.free.pop(), need, self.max_draft))

    def _calibrate_cost(self) -> None:
        """Seed the cost model with the best of a few timed decodes of 1 to 32 tokens (a fraction of a second)."""
        native = self.native
        seq = native.n_seq_max - 1
        for n in (1, 2, 4, 8, 16, 32, 1, 2, 4, 8, 16, 32):
            n = min(n, native.batch_size)
            start = time.perf_counter()
            status = native.decode([0] * n, list(range(n)), [seq] * n, [1] * n)
            elapsed = time.perf_counter() - start
            native.seq_rm(seq, -1, -1)
            if status != 0:
                return
            self.cost.observe(n, elapsed)
        logger.debug(
            "llama.cpp decode cost (tokens, ms): %s", [(n, round(1000 * t, 2)) for n, t in self.cost.points]
        )

    # -- one decode ---------------------------------------------------------------------------

    def _step(self) -> None:
        native = self.native
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[int] = []
        outputs: list[int] = []
        plan: list[
            tuple[Running, list[int], int, int | None]
        ] = []  # seq, draft, first output row, shadow draft
        budget = native.batch_size
        decoding = [s for s in self.active if s.pending is not None]
        prefill = sum(len(s.job.prompt) - s.read for s in self.active if s.pending is None)
        fixed = len(decoding) + min(prefill, budget - len(decoding))
        lengths = (
            self.planner.plan(
                [
                    (s.state, min(s.job.request.max_new_tokens - len(s.tokens) - 1, budget - fixed))
                    if s.state is not None
                    else None
                    for s in decoding
                ],
                fixed,
            )
            if any(s.state is not None for s in decoding)
            else [0] * len(decoding)
        )
        spare = budget - len(decoding)
        rows = 0
        for seq, k in zip(decoding, lengths):
            draft: list[int] = []
            shadow = None
            if seq.drafter is not None:
                draft = seq.drafter.propose(seq.tokens, min(k, spare)) if k > 0 else []
                if not draft:
                    guess = seq.drafter.propose(seq.tokens, 1)
                    shadow = guess[0] if guess else None
                spare -= len(draft)
            block = [seq.pending, *draft]  # type: ignore[list-item]
            tokens += block
            positions += range(seq.n_past, seq.n_past + len(block))
            seqs += [seq.slot] * len(block)
            outputs += [1] * len(block)
            plan.append((seq, draft, rows, shadow))
            rows += len(block)
        left = budget - len(tokens)
        for seq in self.active:
            if seq.pending is not None or left <= 0:
                continue
            prompt = seq.job.prompt
            chunk = prompt[seq.read : seq.read + left]
            last = seq.read + len(chunk) == len(prompt)
            tokens += chunk
            positions += range(seq.read, seq.read + len(chunk))
            seqs += [seq.slot] * len(chunk)
            outputs += [0] * (len(chunk) - 1) + [1 if last else 0]
            plan.append((seq, [], rows if last else -1, None))
            if last:
                rows += 1
            seq.read += len(chunk)
            left -= len(chunk)
        if self.tuner is not None:
            self.tuner.before_decode()
        start = time.perf_counter()
        status = native.decode(tokens, positions, seqs, outputs)
        elapsed = time.perf_counter() - start
        if status != 0:
            self._decode_failed(status, plan)
            return
        self.cost.observe(len(tokens), elapsed)
        if self.tuner is not None:
            self.tuner.after_decode(len(tokens), elapsed)
        stats = self.stats
        stats.decodes += 1
        stats.decoded_tokens += len(tokens)
        sharing = len(plan)
        stats.sequences[sharing] += 1
        stats.max_sequences = max(stats.max_sequences, sharing)
        logits = native.logits(rows) if rows else None
        greedy = logits.argmax(axis=1).tolist() if logits is not None else []
        for seq, draft, row, shadow in plan:
            try:
                if row < 0:
                    continue  # a prompt chunk that does not end the prompt
                self._advance(seq, draft, row, shadow, greedy, logits)
            except BaseException as exc:  # a stream reader gone, a sampling error: this sequence only
                self._release(seq, error=exc)

    def _advance(
        self,
        seq: Running,
        draft: list[int],
        row: int,
        shadow: int | None,
        greedy: list[int],
        logits: np.ndarray | None,
    ) -> None:
        if seq.pending is None:  # the prompt is read: its last row gives the first token
            seq.n_past = len(seq.job.prompt)
            first = seq.pick(row, greedy, logits)
            seq.steps += 1
            self._emit(seq, [first])
            return
        picks = (
            greedy[row : row + len(draft) + 1]
            if seq.rng is None and not seq.penalized
            else [seq.pick(row, greedy, logits)]
        )
        accepted = 0
        while accepted < len(draft) and draft[accepted] == picks[accepted]:
            accepted += 1
        seq.n_past += 1 + accepted
        if accepted < len(draft):  # the rejected tail of the draft leaves the cache
            self.native.seq_rm(seq.slot, seq.n_past, -1)
        seq.steps += 1
        if seq.state is not None:
            if draft:
                seq.proposed += len(draft)
                seq.accepted += accepted
                seq.state.verified(len(draft), accepted)
            elif shadow is not None:
                seq.state.shadow(shadow == picks[0])
        self._emit(seq, draft[:accepted] + [picks[accepted]])

    def _emit(self, seq: Running, new: list[int]) -> None:
        """Append a sequence's new tokens; finish it at EOS, its token limit or a stop string."""
        job = seq.job
        done = False
        for i, token in enumerate(new):
            if self._is_eos(token):
                new, done = new[: i + 1], True
                break
        room = job.request.max_new_tokens - len(seq.tokens)
        if len(new) >= room:
            new, done = new[:room], True
        seq.tokens += new
        if seq.penalized:
            seq.history += new
        if seq.drafter is not None:
            seq.drafter.accepted(seq.tokens)
        if job.progress is not None:
            job.progress.update(tokens=len(new))
        if job.on_text is not None:
            body = seq.tokens[:-1] if done and self._is_eos(seq.tokens[-1]) else seq.tokens
            text = self.decode(body)
            if text != seq.shown and not text.endswith("\ufffd"):
                seq.shown = text
                job.on_text(text)  # may raise StreamCancelled: _step ends this sequence alone
        if not done and job.params.stop:
            longest = max(len(s) for s in job.params.stop)
            tail = self.decode(seq.tokens[-(longest + 8) :])
            done = any(s in tail for s in job.params.stop)
        if done:
            self._release(seq, output=seq.output(self.decode, self._is_eos))
        else:
            seq.pending = seq.tokens[-1]

    def _is_eos(self, token: int) -> bool:
        known = self._eog_cache.get(token)
        if known is None:
            known = self._eog_cache[token] = token in self.eos or self.native.is_eog(token)
        return known

    def _decode_failed(self, status: int, plan: list[tuple[Running, list[int], int, int | None]]) -> None:
        """llama.cpp refused the decode: 1 means no room in the KV cache, anything else a failure of the step."""
        in_step = list(dict.fromkeys(seq for seq, *_ in plan))
        if status == 1:
            victim = max(in_step, key=lambda s: s.job.submitted)
            self._release(
                victim,
                error=AlignerOutOfMemoryError(
                    "llama.cpp found no room in its KV cache for this request: load with a larger n_ctx or a smaller "
                    "n_seq_max, or lower max_new_tokens"
                ),
            )
            for seq in in_step:  # the others retry the step from where their cache really is
                self._rewind(seq)
            return
        error = EngineUnavailableError(
            f"llama_decode failed with status {status} (see the aligner_core.llamacpp log)"
        )
        for seq in in_step:
            self._release(seq, error=error)

    def _rewind(self, seq: Running) -> None:
        if seq not in self.active:
            return
        self.native.seq_rm(seq.slot, seq.n_past if seq.pending is not None else 0, -1)
        if seq.pending is None:
            seq.read = 0

    def _release(
        self, seq: Running, *, output: GenerationOutput | None = None, error: BaseException | None = None
    ) -> None:
        """End a sequence: free its cache cells and slot, and settle its future."""
        if seq in self.active:
            self.active.remove(seq)
            self.native.seq_rm(seq.slot, -1, -1)
            self.free.append(seq.slot)
            self.reserved -= seq.reserved
        if error is not None and seq.job.progress is not None and seq.tokens:
            seq.job.progress.update(tokens=-len(seq.tokens))  # only finished rows count their tokens
        self._settle(seq.job, output=output, error=error)

    @staticmethod
    def _settle(
        job: Job, *, output: GenerationOutput | None = None, error: BaseException | None = None
    ) -> None:
        try:
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(output)  # type: ignore[arg-type]
        except InvalidStateError:  # cancelled meanwhile
            return
        if job.progress is not None:
            job.progress.update(rows=1)


__all__ = ["Worker"]
