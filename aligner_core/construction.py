"""The ways to build an Aligner: load a model (``from_pretrained``), wrap one already loaded (``from_model``),
or reach one served elsewhere (``from_server``).

Each opens an engine and its template (``engines.opening``) and hands them to the Aligner's constructor;
``Aligner`` inherits these class methods, so they read as ``Aligner.from_pretrained(...)``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any, Literal

from .requests import OverflowPolicy
from .templates import Template, bind

if sys.version_info >= (3, 11):
    from typing import Self
else:  # pragma: no cover
    from typing_extensions import Self


class Construction:
    """``from_pretrained``, ``from_model`` and ``from_server`` for :class:`aligner_core.Aligner`."""

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str],
        *,
        template: str | Template | None = None,
        engine: Literal["auto", "transformers", "llama.cpp", "vllm"] = "auto",
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
    ) -> Self:
        """Load an Aligner from a hub id, a local directory or a GGUF file.

        ``template=None`` picks the template recorded in the model (or adapter) directory, then
        ``aligner-v1`` for the official ``aligner/aligner-*`` checkpoints, then ``chat`` when the
        tokenizer has a chat template. ``allow_pickle`` opts in to ``.bin`` weights.

        ``engine="auto"`` (the default) runs a GGUF (the packaged default included) on llama.cpp when neither
        CUDA nor MPS is available, ``llama-cpp-python`` is installed and no transformers-only option is given
        (``device`` other than cpu, ``device_map``, ``quantization``, ``dtype``, ``max_batch_tokens``, a PEFT
        adapter); otherwise on the transformers engine (``engine="transformers"`` forces it).

        ``engine="llama.cpp"`` (alias ``"llamacpp"``; ``pip install "llm-aligner[llamacpp]"``) runs a GGUF file, a
        folder holding one or the packaged default as it is, quantized, with the same prompt token ids as the
        transformers engine. ``adapter`` is a GGUF LoRA file or a PEFT LoRA folder (converted once, cached);
        ``engine_kwargs`` go to ``LlamaCppEngine`` (``n_ctx``, ``n_seq_max``, ``n_threads``, ``drafting``,
        ``n_gpu_layers``, ...). ``device_map``, ``quantization``, ``dtype`` and ``max_batch_tokens`` do not apply.

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
    ) -> Self:
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
    ) -> Self:
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


__all__ = ["Construction"]
