"""Engines: what runs the Aligner model, one module per engine, all behind ``Engine``.

- ``local``: the library's own transformers loop in this process (CPU, CUDA, MPS).
- ``llamacpp``: a GGUF on llama.cpp in this process; extra ``[llamacpp]``. ``choosing`` decides between it and
  ``local`` for ``engine="auto"``; ``opening`` builds whichever is asked for.
- ``server``: any OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, Ollama); extra ``[server]``.
- ``vllm``: vLLM in this process for GPU batch jobs; extra ``[vllm]``.
- ``ray``: a Ray Data job that spreads a dataset over many Aligners; extra ``[ray]``.

Importing this package is cheap: each engine imports its own dependencies when it is built.
"""

from __future__ import annotations

from .base import (
    Engine,
    GenerationOutput,
    GenerationParams,
    GenerationRequest,
    ResultCallback,
    TextSink,
)

__all__ = [
    "Engine",
    "GenerationOutput",
    "GenerationParams",
    "GenerationRequest",
    "ResultCallback",
    "TextSink",
]
