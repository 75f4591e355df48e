"""The thin layer over llama.cpp's C API (through ``llama_cpp``'s ctypes bindings) that the worker drives.

One model, one context with ``n_seq_max`` sequences, and one reusable ``llama_batch`` whose arrays are numpy
buffers, so a step of many sequences is filled with a few slice assignments instead of thousands of ctypes
element writes. Nothing here is thread-safe: llama.cpp contexts are not, and only the engine's worker thread calls
this object after construction.

The bindings have renamed the low-level API more than once (``llama_kv_cache_*`` -> ``llama_kv_self_*`` ->
``llama_memory_*``, ``llama_load_model_from_file`` -> ``llama_model_load_from_file``); the few calls used here try
the current name first. Tested with llama-cpp-python 0.3.36.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import EngineUnavailableError, ModelLoadError, missing

logger = logging.getLogger("aligner_core.llamacpp")

#: llama.cpp's own log lines (model loading prints hundreds) go to this logger at DEBUG; warnings and errors at
#: their own level. Kept at module level so the ctypes callback outlives every engine.
_LOG_CALLBACK: Any = None
_BACKEND_READY = False


def bindings() -> Any:
    """The ``llama_cpp`` module, or an install hint naming the extra."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise missing("llama-cpp-python", "llamacpp", 'engine="llama.cpp"') from exc
    return llama_cpp


def _route_logs(lib: Any) -> None:
    """Send llama.cpp's logging to Python's ``logging`` instead of stderr (once per process)."""
    global _LOG_CALLBACK, _BACKEND_READY
    if _LOG_CALLBACK is None:
        levels = {
            3: logging.WARNING,
            4: logging.ERROR,
        }  # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continued
        native_logger = logging.getLogger("aligner_core.llamacpp.native")

        @lib.llama_log_callback
        def forward(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            message = text.decode("utf-8", "replace").rstrip()
            if message:
                native_logger.log(levels.get(level, logging.DEBUG), "%s", message)

        _LOG_CALLBACK = forward
        lib.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    if not _BACKEND_READY:
        lib.llama_backend_init()
        _BACKEND_READY = True


def _api(lib: Any, *names: str) -> Any:
    for name in names:
        fn = getattr(lib, name, None)
        if fn is not None:
            return fn
    raise EngineUnavailableError(
        f'the installed llama-cpp-python lacks {names[0]}: upgrade it with pip install -U "llm-aligner[llamacpp]"'
    )


@dataclass(frozen=True)
class ContextSettings:
    """What the context is created with (see ``LlamaCppEngine`` for the meaning and the defaults)."""

    n_ctx: int
    n_seq_max: int
    n_batch: int
    n_threads: int
    kv_unified: bool
    flash_attn: bool | None


class NativeModel:
    """A GGUF model and one multi-sequence context, with the batch and logits plumbing the worker needs."""

    def __init__(self, path: str | os.PathLike[str], *, n_gpu_layers: int = 0) -> None:
        """Load the weights (memory-mapped, never dequantized); :meth:`open_context` makes the context."""
        lib = bindings()
        _route_logs(lib)
        self.lib = lib
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"no such GGUF file: {self.path}")
        self.model: Any = None
        self.ctx: Any = None
        self._adapters: list[Any] = []
        self._batch: Any = None
        try:
            self._load_model(n_gpu_layers)
        except BaseException:
            self.close()
            raise

    def _load_model(self, n_gpu_layers: int) -> None:
        lib = self.lib
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        load = _api(lib, "llama_model_load_from_file", "llama_load_model_from_file")
        self.model = load(str(self.path).encode("utf-8"), mparams)
        if not self.model:
            raise ModelLoadError(
                f"llama.cpp could not load {self.path} (see the aligner_core.llamacpp log): is it a "
                "GGUF of an architecture this llama-cpp-python build supports?"
            )
        self.n_ctx_train = int(_api(lib, "llama_model_n_ctx_train", "llama_n_ctx_train")(self.model))
        self.vocab = lib.llama_model_get_vocab(self.model) if hasattr(lib, "llama_model_get_vocab") else None
        n_vocab = _api(lib, "llama_vocab_n_tokens", "llama_n_vocab")
        self.n_vocab = int(n_vocab(self.vocab if self.vocab is not None else self.model))
        self._is_eog = _api(lib, "llama_vocab_is_eog", "llama_token_is_eog")

    def open_context(self, settings: ContextSettings, loras: tuple[tuple[str, float], ...] = ()) -> None:
        """Create the multi-sequence context (and apply LoRA adapters); frees everything when it fails."""
        try:
            self._open_context(settings, loras)
        except BaseException:
            self.close()
            raise

    def _open_context(self, s: ContextSettings, loras: tuple[tuple[str, float], ...]) -> None:
        lib = self.lib
        self.settings = s
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = s.n_ctx
        cparams.n_batch = s.n_batch
        cparams.n_ubatch = s.n_batch
        cparams.n_seq_max = s.n_seq_max
        cparams.n_threads = s.n_threads
        cparams.n_threads_batch = s.n_threads
        cparams.no_perf = True
        if hasattr(cparams, "kv_unified"):
            cparams.kv_unified = s.kv_unified
        if hasattr(cparams, "flash_attn_type"):
            cparams.flash_attn_type = {
                None: lib.LLAMA_FLASH_ATTN_TYPE_AUTO,
                True: lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                False: lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
            }[s.flash_attn]
        elif s.flash_attn is not None and hasattr(cparams, "flash_attn"):
            cparams.flash_attn = s.flash_attn
        init = _api(lib, "llama_init_from_model", "llama_new_context_with_model")
        self.ctx = init(self.model, cparams)
        if not self.ctx:
            raise ModelLoadError(
                f"llama.cpp could not create a context of {s.n_ctx} tokens for {s.n_seq_max} sequences (out of "
                "memory?): lower n_ctx or n_seq_max"
            )
        self.n_ctx = int(lib.llama_n_ctx(self.ctx))
        seq_ctx = getattr(lib, "llama_n_ctx_seq", None)
        self.n_ctx_seq = int(seq_ctx(self.ctx)) if seq_ctx is not None and not s.kv_unified else self.n_ctx
        self.n_seq_max = (
            int(lib.llama_n_seq_max(self.ctx)) if hasattr(lib, "llama_n_seq_max") else s.n_seq_max
        )
        if hasattr(lib, "llama_get_memory"):
            memory = lib.llama_get_memory(self.ctx)
            self._seq_rm = lambda seq, p0, p1: lib.llama_memory_seq_rm(memory, seq, p0, p1)
            self._clear = lambda: lib.llama_memory_clear(memory, True)
        else:  # pragma: no cover - older bindings
            rm = _api(lib, "llama_kv_self_seq_rm", "llama_kv_cache_seq_rm")
            clear = _api(lib, "llama_kv_self_clear", "llama_kv_cache_clear")
            self._seq_rm = lambda seq, p0, p1: rm(self.ctx, seq, p0, p1)
            self._clear = lambda: clear(self.ctx)
        for path, scale in loras:
            self._add_lora(path, scale)
        self._make_batch(s.n_batch)

    def _add_lora(self, path: str, scale: float) -> None:
        lib = self.lib
        adapter = lib.llama_adapter_lora_init(self.model, str(path).encode("utf-8"))
        if not adapter:
            raise ModelLoadError(
                f"llama.cpp could not load the LoRA adapter {path} (see the aligner_core.llamacpp log)"
            )
        self._adapters.append((adapter, float(scale)))
        n = len(self._adapters)
        if hasattr(lib, "llama_set_adapters_lora"):
            ptrs = (lib.llama_adapter_lora_p_ctypes * n)(*[a for a, _ in self._adapters])
            scales = (ctypes.c_float * n)(*[sc for _, sc in self._adapters])
            failed = lib.llama_set_adapters_lora(self.ctx, ptrs, n, scales)
        else:  # pragma: no cover - older bindings
            failed = lib.llama_set_adapter_lora(self.ctx, adapter, float(scale))
        if failed:
            raise ModelLoadError(f"llama.cpp refused the LoRA adapter {path} for this model")

    def _make_batch(self, size: int) -> None:
        """A ``llama_batch`` over numpy arrays owned here; each token belongs to exactly one sequence."""
        lib = self.lib
        self._tokens = np.zeros(size, dtype=np.int32)
        self._pos = np.zeros(size, dtype=np.int32)
        self._n_seq = np.ones(size, dtype=np.int32)
        self._seq = np.zeros(size, dtype=np.int32)
        self._out = np.zeros(size, dtype=np.int8)
        i32 = ctypes.POINTER(ctypes.c_int32)
        base = self._seq.ctypes.data
        self._seq_ptrs = (i32 * size)(*[ctypes.cast(base + 4 * i, i32) for i in range(size)])
        batch = lib.llama_batch()
        batch.n_tokens = 0
        batch.token = self._tokens.ctypes.data_as(i32)
        batch.embd = None
        batch.pos = self._pos.ctypes.data_as(i32)
        batch.n_seq_id = self._n_seq.ctypes.data_as(i32)
        batch.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(i32))
        batch.logits = self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self._batch = batch
        self.batch_size = size

    # -- what the worker calls ----------------------------------------------------------------

    def decode(self, tokens: list[int], positions: list[int], seqs: list[int], outputs: list[int]) -> int:
        """One ``llama_decode`` of ``len(tokens)`` tokens (at most ``batch_size``); returns llama.cpp's status."""
        n = len(tokens)
        self._tokens[:n] = tokens
        self._pos[:n] = positions
        self._seq[:n] = seqs
        self._out[:n] = outputs
        self._batch.n_tokens = n
        return int(self.lib.llama_decode(self.ctx, self._batch))

    def logits(self, rows: int) -> np.ndarray:
        """The logits of the last decode's output tokens, in batch order (a view, valid until the next decode)."""
        ptr = self.lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(rows, self.n_vocab))

    def set_threads(self, threads: int) -> None:
        """Threads of the next decodes (llama.cpp takes a new count between decodes)."""
        self.lib.llama_set_n_threads(self.ctx, threads, threads)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        """Forget sequence ``seq``'s tokens at positions ``[p0, p1)`` (-1: open end)."""
        self._seq_rm(seq, p0, p1)

    def clear(self) -> None:
        self._clear()

    def is_eog(self, token: int) -> bool:
        return bool(self._is_eog(self.vocab if self.vocab is not None else self.model, token))

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """llama.cpp's own tokenizer (the engine encodes with the Hugging Face one; this is for checks)."""
        lib = self.lib
        data = text.encode("utf-8")
        room = len(data) + 16
        buf = (ctypes.c_int32 * room)()
        vocab = self.vocab if self.vocab is not None else self.model
        n = lib.llama_tokenize(vocab, data, len(data), buf, room, add_special, parse_special)
        if n < 0:  # pragma: no cover - room is always enough for byte-level vocabularies
            buf = (ctypes.c_int32 * -n)()
            n = lib.llama_tokenize(vocab, data, len(data), buf, -n, add_special, parse_special)
        return list(buf[:n])

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V cache one token takes across layers (f16), for sizing the context."""
        lib = self.lib
        try:
            layers = int(lib.llama_model_n_layer(self.model))
            heads, kv_heads = (
                int(lib.llama_model_n_head(self.model)),
                int(lib.llama_model_n_head_kv(self.model)),
            )
            head_dim = int(lib.llama_model_n_embd(self.model)) // max(1, heads)
        except AttributeError:  # pragma: no cover
            return 0
        return 2 * layers * kv_heads * head_dim * 2

    def close(self) -> None:
        """Free the context, adapters and model (idempotent)."""
        lib = self.lib
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        for adapter, _ in self._adapters:
            free = getattr(lib, "llama_adapter_lora_free", None)
            if free is not None:
                free(adapter)
        self._adapters = []
        if self.model:
            _api(lib, "llama_model_free", "llama_free_model")(self.model)
            self.model = None


__all__ = ["ContextSettings", "NativeModel", "bindings"]
