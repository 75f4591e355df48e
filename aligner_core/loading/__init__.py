"""Finding and loading models: a hub id, a local directory or a GGUF file (``models``), and the cache of
dequantized GGUF copies (``cache``, ``aligner cache list|clear``)."""

from .cache import cache_root
from .models import (
    ALIGNER_CONFIG,
    DEFAULT_MODEL,
    ModelSource,
    dedupe_library_logs,
    dequantize_gguf,
    gguf_copy_dir,
    is_official_checkpoint,
    load_error,
    load_model,
    packaged_model_missing,
    packaged_model_path,
    quantization_config,
    read_recorded_template,
    resolve_device,
    resolve_dtype,
    resolve_source,
    write_aligner_config,
)

__all__ = [
    "ALIGNER_CONFIG",
    "DEFAULT_MODEL",
    "ModelSource",
    "cache_root",
    "dedupe_library_logs",
    "dequantize_gguf",
    "gguf_copy_dir",
    "is_official_checkpoint",
    "load_error",
    "load_model",
    "packaged_model_missing",
    "packaged_model_path",
    "quantization_config",
    "read_recorded_template",
    "resolve_device",
    "resolve_dtype",
    "resolve_source",
    "write_aligner_config",
]
