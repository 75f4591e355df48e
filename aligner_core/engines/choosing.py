"""Which local engine runs a model when ``engine`` is left at ``"auto"``: the measured-fastest one that applies.

On a machine without an accelerator, llama.cpp runs a GGUF (the packaged default included) about 4.5x sooner at
batch 1 than the transformers engine, which dequantizes it to float32 and decodes in a Python loop. So ``"auto"``
picks ``"llama.cpp"`` when all of these hold, and ``"transformers"`` otherwise:

- the model is a GGUF file (or a folder with one, a hub id with ``gguf_file``, the packaged default);
- no option ties it to the transformers engine (``device`` other than cpu, ``device_map``, ``quantization``, a
  ``dtype`` other than ``"auto"``, ``max_batch_tokens``, a PEFT adapter folder: it runs exactly as trained there;
  ``engine="llama.cpp"`` converts it);
- neither CUDA nor MPS is available (on a GPU the transformers engine batches on the GPU);
- ``llama_cpp`` is importable (``pip install "llm-aligner[llamacpp]"``). Without it, one log line per process says
  what installing it would give.

``engine="transformers"`` or ``engine="llama.cpp"`` always wins over this rule.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("aligner_core")

#: The names ``engine=`` takes for local engines (``"llamacpp"`` is an alias of ``"llama.cpp"``).
LOCAL_ENGINES = ("auto", "transformers", "llama.cpp", "llamacpp", "vllm")
#: The install hint logged once when ``"auto"`` would have picked llama.cpp but it is not installed.
INSTALL_HINT = (
    "this GGUF would run about 4x faster on llama.cpp: pip install 'llm-aligner[llamacpp]' "
    "(it compiles llama.cpp for about 6 minutes); running it on the transformers engine"
)

_hinted = False


def canonical(engine: str | None) -> str:
    """The engine's canonical name (``None`` -> ``"auto"``, ``"llamacpp"`` -> ``"llama.cpp"``); ``ValueError``
    for an unknown one."""
    name = "auto" if engine is None else str(engine).strip().lower()
    if name not in LOCAL_ENGINES:
        raise ValueError(
            f"engine must be one of 'auto', 'transformers', 'llama.cpp' or 'vllm', got {engine!r} "
            "(for a server use Aligner.from_server)"
        )
    return "llama.cpp" if name == "llamacpp" else name


def llama_cpp_installed() -> bool:
    """Whether ``llama_cpp`` can be imported (found without importing it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def has_accelerator() -> bool:
    """Whether torch sees a CUDA or MPS device (False when torch is missing)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    if torch.cuda.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def is_gguf(model: str | os.PathLike[str], gguf_file: str | None = None) -> bool:
    """Whether ``model`` names a GGUF for llama.cpp, decided offline (any doubt: False)."""
    from ..loading import packaged_model_path, resolve_source

    text = os.fspath(model)
    if gguf_file is None and packaged_model_path(text) is not None:
        return True
    try:
        source = resolve_source(model, gguf_file)
    except Exception:  # the transformers path reports a bad model with its own message
        return False
    return source.kind == "gguf" or (source.kind == "hub" and source.gguf_file is not None)


def transformers_only(
    *,
    device: str | None = None,
    device_map: Any = None,
    quantization: Any = None,
    dtype: Any = "auto",
    adapter: str | os.PathLike[str] | None = None,
    max_batch_tokens: int | None = None,
) -> list[str]:
    """The options given that only the transformers engine takes (empty when llama.cpp could run the call)."""
    found = []
    if device is not None and str(device) != "cpu":
        found.append(f"device={device!r}")
    for name, value in (
        ("device_map", device_map),
        ("quantization", quantization),
        ("max_batch_tokens", max_batch_tokens),
    ):
        if value is not None:
            found.append(f"{name}={value!r}")
    if not (isinstance(dtype, str) and dtype == "auto"):
        found.append(f"dtype={dtype!r}")
    if adapter is not None and not is_gguf_lora(adapter):
        found.append("a PEFT adapter")
    return found


def is_gguf_lora(adapter: str | os.PathLike[str]) -> bool:
    path = Path(adapter)
    return path.suffix.lower() == ".gguf" and path.is_file()


def choose_engine(
    model: str | os.PathLike[str],
    *,
    gguf_file: str | None = None,
    llama_cpp: bool | None = None,
    accelerator: bool | None = None,
    hint: bool = True,
    **options: Any,
) -> str:
    """``"llama.cpp"`` or ``"transformers"`` for ``engine="auto"`` (see the module docstring).

    ``options``: the ``transformers_only`` options of the call. ``llama_cpp`` and ``accelerator`` say whether
    llama-cpp-python is installed and an accelerator is present (None: look); ``hint`` logs the install hint (once
    per process) when llama.cpp would have been chosen but is missing.
    """
    if not is_gguf(model, gguf_file) or transformers_only(**options):
        return "transformers"
    if accelerator if accelerator is not None else has_accelerator():
        return "transformers"
    if llama_cpp if llama_cpp is not None else llama_cpp_installed():
        return "llama.cpp"
    if hint:
        _hint_once()
    return "transformers"


def _hint_once() -> None:
    global _hinted
    if not _hinted:
        _hinted = True
        logger.info(INSTALL_HINT)


def default_engine_line() -> str:
    """Which engine the packaged default model runs on here, for ``aligner --version``."""
    from ..loading import DEFAULT_MODEL

    engine = choose_engine(DEFAULT_MODEL, hint=False)
    if engine == "transformers" and not llama_cpp_installed() and is_gguf(DEFAULT_MODEL):
        return "default engine: transformers (pip install 'llm-aligner[llamacpp]' to run GGUFs on llama.cpp)"
    return f"default engine: {engine}"


__all__ = [
    "INSTALL_HINT",
    "LOCAL_ENGINES",
    "canonical",
    "choose_engine",
    "default_engine_line",
    "has_accelerator",
    "is_gguf",
    "llama_cpp_installed",
    "transformers_only",
]
