"""The llama.cpp engine: a GGUF model run by llama.cpp in this process, without dequantizing it.

On a CPU this is the fastest way to run the packaged default: llama.cpp reads the 93 MB Q4_1 weights in C++
where the transformers engine reads a 540 MB float32 copy through a Python loop. Prompts are encoded with the
model's Hugging Face tokenizer, so every engine sends the same token ids for the same GGUF (llama.cpp's own
tokenizer agrees on the official templates; the tests check both). A single worker thread owns the llama.cpp
context (``worker.py``): every entry point queues a job, and the worker decodes all admitted sequences together
in one ``llama_decode`` per step. Answer-anchored drafting (``drafting.py``) is an engine setting, off by default
because on the measured CPU it was not reliably faster (docs/engines.md, docs/performance.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, Future, wait
from pathlib import Path
from typing import Any

from ...errors import ContextOverflowError, EngineClosedError, InvalidInputError, ModelLoadError
from ...loading import ModelSource
from ...plaintext import encode_text
from ...progress import Progress
from ..base import GenerationOutput, GenerationParams, GenerationRequest, ResultCallback, TextSink
from .drafting import CostModel
from .native import ContextSettings, NativeModel
from .sequences import Job, Stats
from .threads import ThreadTuner, candidates
from .worker import Worker

logger = logging.getLogger("aligner_core.llamacpp")

#: KV cache the engine sizes its sequence slots to when ``n_seq_max`` is not given. llama.cpp allocates it at once:
#: 1 GiB holds 11 sequences of 4096 tokens of the packaged SmolLM2 (about 1.2 GB per engine in all); on a CPU a
#: decode of 11 sequences already uses every core, so more slots would add memory, not throughput.
DEFAULT_KV_CACHE_BYTES = 1 << 30
#: Longest context per sequence by default (prompt + new tokens), capped by what the model was trained on.
DEFAULT_CONTEXT = 4096
#: Most sequences decoded together by default.
DEFAULT_MAX_SEQUENCES = 32
#: Longest draft one sequence verifies in a step.
DEFAULT_MAX_DRAFT = 32


class LlamaCppEngine:
    """Runs a GGUF model on llama.cpp. See ``Aligner.from_pretrained(..., engine="llama.cpp")``.

    Build it with :meth:`from_pretrained` (GGUF file, a folder holding one, or the packaged default) or from a
    GGUF path and a ready tokenizer. Options (all keyword-only):

    - ``n_ctx``: tokens per sequence, prompt and completion together (default: the model's trained context,
      at most 4096); this is ``context_length``.
    - ``n_seq_max``: sequences decoded together (default: as many as ``kv_cache_bytes`` holds at ``n_ctx``
      each, at most 32). More requests wait in a queue and take a slot as soon as one frees up.
    - ``kv_unified``: one KV buffer shared by all sequences (``n_ctx`` is then the total, admission reserves
      each request's prompt + ``max_new_tokens``) instead of one per sequence (default False: faster attention,
      measured 145 ms against 197 ms per step at 32 sequences of 300 tokens).
    - ``drafting``: verify drafts taken from the answer (default False; see docs/engines.md for when it pays);
      ``max_draft_tokens`` caps one draft. The per-call ``speculative=False`` turns it off for a call.
    - ``n_threads`` (default: ``$ALIGNER_CPU_THREADS``, else the physical cores this process may use or fewer,
      whichever measures faster while the engine runs: ``threads.py``),
      ``n_batch`` (most tokens per decode, 512), ``flash_attn`` (None: llama.cpp decides), ``n_gpu_layers``
      (0; -1 offloads every layer in a GPU build), ``lora`` (GGUF LoRA files, or ``(path, scale)`` pairs).
    """

    name = "llama.cpp"
    tokenizes_locally = True

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        tokenizer: Any,
        *,
        n_ctx: int | None = None,
        n_seq_max: int | None = None,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        kv_unified: bool = False,
        n_batch: int = 512,
        n_threads: int | None = None,
        flash_attn: bool | None = None,
        n_gpu_layers: int = 0,
        drafting: bool = False,
        max_draft_tokens: int = DEFAULT_MAX_DRAFT,
        lora: Sequence[str | os.PathLike[str] | tuple[str | os.PathLike[str], float]] = (),
        max_queue: int = 4096,
    ) -> None:
        for name, value in (("n_ctx", n_ctx), ("n_seq_max", n_seq_max)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name, value in (
            ("n_batch", n_batch),
            ("max_queue", max_queue),
            ("kv_cache_bytes", kv_cache_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if (
            isinstance(max_draft_tokens, bool)
            or not isinstance(max_draft_tokens, int)
            or max_draft_tokens < 0
        ):
            raise ValueError(f"max_draft_tokens must be an integer >= 0, got {max_draft_tokens!r}")
        if not isinstance(drafting, bool):
            raise ValueError(f"drafting must be True or False, got {drafting!r}")
        self.tokenizer = tokenizer
        self.drafting = drafting and max_draft_tokens > 0
        native = NativeModel(model_path, n_gpu_layers=n_gpu_layers)
        try:
            per_seq = (
                min(n_ctx or DEFAULT_CONTEXT, native.n_ctx_train or DEFAULT_CONTEXT)
                if n_ctx is None
                else n_ctx
            )
            if n_seq_max is None:
                per_bytes = max(1, per_seq * native.kv_bytes_per_token())
                n_seq_max = max(1, min(DEFAULT_MAX_SEQUENCES, kv_cache_bytes // per_bytes))
            fixed_threads = n_threads or _env_threads()
            settings = ContextSettings(
                n_ctx=per_seq if kv_unified else per_seq * n_seq_max,
                n_seq_max=n_seq_max,
                n_batch=max(n_batch, n_seq_max),
                n_threads=fixed_threads or default_threads(),
                kv_unified=kv_unified,
                flash_attn=flash_attn,
            )
            native.open_context(settings, tuple(_lora_pairs(lora)))
        except BaseException:
            native.close()
            raise
        #: Longest prompt + completion one request may have, in tokens.
        self.context_length: int | None = min(native.n_ctx_seq, per_seq) if not kv_unified else native.n_ctx
        self.n_seq_max = native.n_seq_max
        self.settings = settings
        self.model_path = str(model_path)
        self.eos_token_ids = _eos_ids(tokenizer)
        self._decode_lock = (
            threading.Lock()
        )  # a fast tokenizer shared across threads can fail "Already borrowed"
        cost = CostModel()
        tuner = (
            None
            if fixed_threads
            else ThreadTuner(candidates(settings.n_threads), native.set_threads, cost.time)
        )
        self.worker = Worker(
            native,
            eos_token_ids=self.eos_token_ids,
            decode=_decoder(
                tokenizer, self._decode_lock
            ),  # not self.decode: the thread must not keep self alive
            context_length=self.context_length,
            capacity=native.n_ctx if kv_unified else None,
            max_draft_tokens=max_draft_tokens,
            max_queue=max_queue,
            cost=cost,
            calibrate=self.drafting,
            tuner=tuner,
        )
        # An engine dropped without close() frees its worker thread, context and KV cache when it is collected.
        self._finalizer = weakref.finalize(self, self.worker.close)
        logger.info(
            "llama.cpp engine: %s, %d sequences x %d tokens, %d threads, drafting %s",
            Path(model_path).name,
            self.n_seq_max,
            self.context_length,
            settings.n_threads,
            "on" if self.drafting else "off",
        )

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str],
        *,
        gguf_file: str | None = None,
        tokenizer: Any = None,
        adapter: str | os.PathLike[str] | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        **options: Any,
    ) -> tuple[LlamaCppEngine, ModelSource, Any]:
        """Load a GGUF into llama.cpp; returns ``(engine, source, tokenizer)`` like the other engines' openers.

        ``model``: a GGUF file, a folder holding one (``gguf_file`` picks among several), a hub id with
        ``gguf_file``, or the packaged default ``HuggingFaceTB/SmolLM2-135M-Instruct`` (its GGUF, never a
        dequantized copy). ``adapter``: a PEFT LoRA folder (converted once to a GGUF LoRA, cached) or a GGUF LoRA
        file. ``options`` go to the constructor.
        """
        from .files import gguf_path, load_tokenizer, lora_file

        source, path = gguf_path(model, gguf_file, revision=revision)
        if adapter is not None:
            options["lora"] = (*options.get("lora", ()), lora_file(adapter, path))
        tok = load_tokenizer(source, path, tokenizer, trust_remote_code=trust_remote_code)
        return cls(path, tok, **options), source, tok

    # -- tokens -------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool, split_special_tokens: bool = False) -> list[int]:
        with self._decode_lock:
            return encode_text(
                self.tokenizer,
                text,
                add_special_tokens=add_special_tokens,
                split_special_tokens=split_special_tokens,
            )

    def decode(self, token_ids: Sequence[int]) -> str:
        return _decoder(self.tokenizer, self._decode_lock)(token_ids)

    @property
    def stats(self) -> Stats:
        """Decodes run so far and how many sequences shared them (``Stats.sequences``: a histogram)."""
        return self.worker.stats

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
        """Queue every request at once (the worker decodes them together); results in request order.

        ``progress`` gets tokens as they are decoded and each row as it finishes; ``on_result`` is called on
        this thread, in completion order. With ``fail_fast`` the first failure cancels the rest and is raised.
        """
        if not requests:
            return []
        if fail_fast:
            jobs = [self._job(request, params, progress=progress) for request in requests]
            futures = self.worker.submit_many(jobs)
        else:
            futures = []
            jobs = []
            for request in requests:
                try:
                    jobs.append(self._job(request, params, progress=progress))
                except Exception as exc:  # refused before queuing: it fails alone
                    failed: Future[GenerationOutput] = Future()
                    failed.set_exception(exc)
                    if progress is not None:
                        progress.update(rows=1)
                    futures.append(failed)
                    continue
                futures.append(jobs[-1].future)
            self.worker.submit_many(jobs)
        index = {id(f): i for i, f in enumerate(futures)}
        results: list[GenerationOutput | BaseException | None] = [None] * len(futures)
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION if fail_fast else FIRST_COMPLETED)
                for f in done:
                    i = index[id(f)]
                    error = f.exception()
                    if error is not None and fail_fast:
                        raise error
                    results[i] = error if error is not None else f.result()
                    if on_result is not None:
                        on_result(i, results[i])  # type: ignore[arg-type]
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        return results  # type: ignore[return-value]

    def submit(self, request: GenerationRequest, params: GenerationParams) -> Future[GenerationOutput]:
        return self.worker.submit(self._job(request, params))

    async def agenerate(self, request: GenerationRequest, params: GenerationParams) -> GenerationOutput:
        # Cancelling the awaiting task cancels the future, which the worker sees at its next step.
        return await asyncio.wrap_future(await self._submit_async(self._job(request, params)))

    def stream(
        self, request: GenerationRequest, params: GenerationParams, on_text: TextSink
    ) -> Future[GenerationOutput]:
        return self.worker.submit(self._job(request, params, on_text=on_text))

    async def astream(
        self, request: GenerationRequest, params: GenerationParams, on_text: TextSink
    ) -> GenerationOutput:
        return await asyncio.wrap_future(
            await self._submit_async(self._job(request, params, on_text=on_text))
        )

    def close(self) -> None:
        """Fail queued and running requests with ``EngineClosedError``, stop the worker and free the model."""
        self.worker.close()

    def __repr__(self) -> str:
        return (
            f"LlamaCppEngine({Path(self.model_path).name!r}, n_seq_max={self.n_seq_max}, "
            f"context_length={self.context_length}, drafting={self.drafting})"
        )

    # -- internals ----------------------------------------------------------------------------

    async def _submit_async(self, job: Job) -> Future[GenerationOutput]:
        """Queue from a coroutine; when the queue is full, wait for room in a thread, not on the loop."""
        try:
            return self.worker.submit(job, block=False)
        except queue.Full:
            return await asyncio.to_thread(self.worker.submit, job)

    def _job(
        self,
        request: GenerationRequest,
        params: GenerationParams,
        *,
        on_text: TextSink | None = None,
        progress: Progress | None = None,
    ) -> Job:
        if self.worker.closed:
            raise EngineClosedError("this Aligner's llama.cpp engine is closed: create a new one")
        prompt = list(request.prompt_ids) or self.encode(
            request.prompt, add_special_tokens=request.add_special_tokens
        )
        if not prompt:
            raise InvalidInputError("the prompt is empty: there is nothing for the model to read")
        ctx = self.context_length
        if ctx is not None and len(prompt) + request.max_new_tokens > ctx:
            raise ContextOverflowError(
                f"the prompt is {len(prompt)} tokens and max_new_tokens is {request.max_new_tokens}, more than the "
                f"llama.cpp engine's context of {ctx} tokens per sequence: shorten the answer, lower max_new_tokens, "
                "pass on_overflow='truncate', or load with a larger n_ctx"
            )
        draft = self.drafting and params.drafting and bool(request.draft_ids)
        return Job(request, prompt, params, draft, on_text=on_text, progress=progress)


def _env_threads() -> int | None:
    """``$ALIGNER_CPU_THREADS`` (the knob the transformers engine reads too), when set to a whole number."""
    wanted = os.environ.get("ALIGNER_CPU_THREADS")
    if wanted:
        try:
            return max(1, int(wanted))
        except ValueError:
            logger.warning("ALIGNER_CPU_THREADS=%r is not a whole number: ignored", wanted)
    return None


def default_threads() -> int:
    """The physical cores this process may run on (hyper-threads add little to llama.cpp's matrix products):
    the transformers engine's rule (``engines/local/threads.py``), without importing torch."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        usable = os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    try:
        physical = "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                physical = value.strip()
            elif key.strip() == "core id":
                cores.add((physical, value.strip()))
    except OSError:
        pass
    return max(1, min(usable, len(cores)) if cores else usable)


def _lora_pairs(lora: Sequence[Any]) -> list[tuple[str, float]]:
    pairs = []
    for item in lora:
        path, scale = item if isinstance(item, tuple) else (item, 1.0)
        if not Path(path).is_file():
            raise ModelLoadError(f"no such LoRA file: {path} (engine='llama.cpp' takes GGUF LoRA adapters)")
        pairs.append((os.fspath(path), float(scale)))
    return pairs


def _eos_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's EOS ids; the worker adds every end-of-generation token llama.cpp knows for the model."""
    value = getattr(tokenizer, "eos_token_id", None)
    values = value if isinstance(value, (list, tuple)) else [value]
    return [int(v) for v in values if v is not None]


def open_llamacpp(model: str | os.PathLike[str], **options: Any) -> tuple[LlamaCppEngine, ModelSource, Any]:
    """``(engine, source, tokenizer)`` for ``engine="llama.cpp"`` (see :meth:`LlamaCppEngine.from_pretrained`)."""
    return LlamaCppEngine.from_pretrained(model, **options)


def _decoder(tokenizer: Any, lock: threading.Lock) -> Callable[[Sequence[int]], str]:
    """Token ids to text, one thread at a time (a fast tokenizer shared across threads can fail "Already borrowed")."""

    def decode(token_ids: Sequence[int]) -> str:
        with lock:
            return tokenizer.decode(list(token_ids), skip_special_tokens=True)

    return decode


__all__ = ["LlamaCppEngine", "default_threads", "open_llamacpp"]
