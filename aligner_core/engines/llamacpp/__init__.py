"""The llama.cpp engine (extra ``[llamacpp]``): GGUF models run by llama.cpp in this process.

``engine`` (the ``Engine`` protocol over it, and ``open_llamacpp``), ``worker`` (the thread that owns the
llama.cpp context and batches every request continuously), ``sequences`` (what the worker tracks per request, and
sampling), ``threads`` (the thread count, measured while it runs), ``drafting`` (answer-anchored drafts whose length
follows measured cost and acceptance), ``native`` (the C API through ``llama_cpp``'s ctypes bindings) and
``files`` (which GGUF, its tokenizer, LoRA adapters). Importing this package does not import ``llama_cpp``:
the engine does when it is built.
"""

from .engine import LlamaCppEngine, open_llamacpp

__all__ = ["LlamaCppEngine", "open_llamacpp"]
