"""What the llama.cpp engine loads besides the weights: which GGUF file, the tokenizer that encodes for it, and a
LoRA adapter as llama.cpp reads one.

- **The GGUF.** A file, a folder holding one, a hub id with ``gguf_file``, or the packaged default id, which here
  always means the packaged GGUF (the transformers engine may prefer a dequantized copy; llama.cpp never needs one).
- **The tokenizer.** Prompts are encoded with the Hugging Face tokenizer of the same GGUF, so the token ids equal
  the other engines'. Converting it from the GGUF takes transformers several seconds, so it is taken from the
  dequantized copy when the transformers engine already made one, else converted once and cached under
  ``<cache root>/tokenizers`` (keyed by the GGUF's content, like the dequantized copies).
- **A LoRA adapter.** llama.cpp applies GGUF LoRA adapters on top of the quantized weights. A PEFT adapter folder
  (what ``aligner train --lora`` writes) is converted once into one, cached under ``<cache root>/lora``: the same
  tensors renamed to llama.cpp's names, with the query/key rows permuted the way llama.cpp's converter permutes
  the base weights of llama-architecture models.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ...errors import ModelLoadError, missing
from ...loading import ModelSource

logger = logging.getLogger("aligner_core.llamacpp")

#: Bump when the converted LoRA files change.
LORA_CONVERSION = 1


def gguf_path(
    model: str | os.PathLike[str], gguf_file: str | None, *, revision: str | None = None
) -> tuple[ModelSource, Path]:
    """The ``ModelSource`` and the GGUF file llama.cpp loads for ``model`` (``ModelLoadError`` when it is no GGUF)."""
    from ...loading import packaged_model_missing, packaged_model_path, resolve_source
    from ...loading.models import PACKAGED_MODELS

    text = os.fspath(model)
    if gguf_file is None and text in PACKAGED_MODELS:
        packaged = packaged_model_path(text)
        if packaged is None:
            raise packaged_model_missing(text)
        return ModelSource("gguf", str(packaged.parent), packaged.name, name=text), packaged
    source = resolve_source(model, gguf_file)
    if source.kind == "hub" and source.gguf_file:
        try:
            from huggingface_hub import hf_hub_download

            local = hf_hub_download(source.location, source.gguf_file, revision=revision)
        except Exception as exc:
            raise ModelLoadError(f"could not fetch {source.gguf_file} from {source.location}: {exc}") from exc
        return ModelSource("gguf", str(Path(local).parent), Path(local).name, name=source.name), Path(local)
    if source.kind != "gguf":
        raise ModelLoadError(
            f"engine='llama.cpp' runs GGUF files, and {text!r} holds none: pass a .gguf file (convert a model with "
            "llama.cpp's convert_hf_to_gguf.py), a folder holding one, or use engine='transformers'"
        )
    return source, Path(source.location) / str(source.gguf_file)


def load_tokenizer(
    source: ModelSource, path: Path, tokenizer: Any = None, *, trust_remote_code: bool = False
) -> Any:
    """The Hugging Face tokenizer for ``path``: the one given, the dequantized copy's, or a cached conversion."""
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(os.fspath(tokenizer), trust_remote_code=trust_remote_code)
    from ...loading import cache as model_cache
    from ...loading import cache_root, gguf_copy_dir

    local = ModelSource("gguf", str(path.parent), path.name, name=source.name)
    copy = gguf_copy_dir(local)
    if model_cache.is_complete(copy):
        return AutoTokenizer.from_pretrained(str(copy), trust_remote_code=trust_remote_code)
    key = hashlib.sha256(
        f"{model_cache.content_hash(path)}|{model_cache.conversion_tag()}".encode()
    ).hexdigest()[:24]
    cached = cache_root() / "tokenizers" / key
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached), trust_remote_code=trust_remote_code)
    logger.info("reading the tokenizer of %s once (cached at %s)", path.name, cached)
    tok = AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name, trust_remote_code=trust_remote_code
    )
    with contextlib.suppress(OSError):  # a read-only cache still works: the next load converts again
        _save_atomically(cached, tok.save_pretrained)
    return tok


def lora_file(adapter: str | os.PathLike[str], base: Path) -> str:
    """A GGUF LoRA for llama.cpp: ``adapter`` itself when it is one, else its PEFT folder converted once (cached)."""
    path = Path(adapter)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(path)
    weights = path / "adapter_model.safetensors"
    if not (path / "adapter_config.json").is_file() or not weights.is_file():
        raise ModelLoadError(
            f"the adapter {str(adapter)!r} is neither a GGUF LoRA file nor a PEFT folder with adapter_config.json and "
            "adapter_model.safetensors"
        )
    from ...loading import cache as model_cache
    from ...loading import cache_root

    digest = hashlib.sha256()
    for part in (
        (path / "adapter_config.json").read_bytes(),
        model_cache.content_hash(weights).encode(),
        model_cache.content_hash(base).encode(),
        str(LORA_CONVERSION).encode(),
    ):
        digest.update(part)
    target = cache_root() / "lora" / f"{digest.hexdigest()[:24]}.gguf"
    if not target.is_file():
        logger.info("converting the LoRA adapter %s for llama.cpp once (cached at %s)", path, target)
        _save_atomically(target, lambda tmp: convert_peft_lora(path, base, tmp))
    return str(target)


def convert_peft_lora(adapter_dir: Path, base: Path, out: str | os.PathLike[str]) -> None:
    """Write the PEFT LoRA in ``adapter_dir`` as a GGUF LoRA for the llama-architecture GGUF ``base``."""
    import gguf
    import numpy as np

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("use_dora") or config.get("use_rslora"):
        raise ModelLoadError(
            f"{adapter_dir}: DoRA and rsLoRA adapters cannot run on llama.cpp; merge the adapter "
            "and convert the merged model, or use engine='transformers'"
        )
    header = gguf.GGUFReader(str(base))

    def value(key: str) -> Any:
        field = header.fields.get(key)
        if field is None or not field.data:
            return None
        part = field.parts[field.data[0]]
        return (
            bytes(part).decode("utf-8")
            if field.types and field.types[0] == gguf.GGUFValueType.STRING
            else part[0]
        )

    arch = value("general.architecture")
    if arch != "llama":
        raise ModelLoadError(
            f"converting a PEFT LoRA is supported for llama-architecture GGUFs, {base.name} is "
            f"{arch!r}: convert it with llama.cpp's convert_lora_to_gguf.py and pass the .gguf file"
        )
    blocks, heads = int(value("llama.block_count")), int(value("llama.attention.head_count"))
    kv_heads = int(value("llama.attention.head_count_kv") or heads)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    tensors = _read_safetensors(adapter_dir / "adapter_model.safetensors")
    pairs: dict[str, dict[str, Any]] = {}
    for name, array in tensors.items():
        for marker, part in ((".lora_A.weight", "a"), (".lora_B.weight", "b")):
            if name.endswith(marker):
                base_name = name[: -len(marker)].removeprefix("base_model.model.") + ".weight"
                pairs.setdefault(base_name, {})[part] = array
                break
        else:
            raise ModelLoadError(
                f"{adapter_dir}: tensor {name!r} is not a LoRA A/B matrix (trained embeddings or "
                "extra modules cannot run on llama.cpp)"
            )
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.get("lora_alpha", config.get("r", 8))))
    for hf_name, ab in sorted(pairs.items()):
        if set(ab) != {"a", "b"}:
            raise ModelLoadError(f"{adapter_dir}: {hf_name} has only one of its LoRA matrices")
        target = names.get_name(hf_name, try_suffixes=(".weight",))
        if target is None:
            raise ModelLoadError(f"{adapter_dir}: no llama.cpp tensor for {hf_name}")
        a, b = np.asarray(ab["a"], dtype=np.float32), np.asarray(ab["b"], dtype=np.float32)
        if hf_name.endswith("q_proj.weight"):
            b = _permute_rows(b, heads)
        elif hf_name.endswith("k_proj.weight"):
            b = _permute_rows(b, kv_heads)
        writer.add_tensor(target + ".lora_a", np.ascontiguousarray(a))
        writer.add_tensor(target + ".lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _permute_rows(weights: Any, heads: int) -> Any:
    """llama.cpp's converter interleaves the two rotary halves of each query/key head; do the same to B's rows."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _read_safetensors(path: Path) -> dict[str, Any]:
    """Adapter tensors as numpy arrays (float32 adapters without torch; bfloat16 ones through torch)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (TypeError, ValueError):
        pass
    try:
        import torch  # noqa: F401
    except ImportError as exc:  # pragma: no cover - torch is a dependency of the package
        raise missing("torch", feature="reading a bfloat16 LoRA adapter") from exc
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).float().numpy() for k in f.keys()}  # noqa: SIM118


def _save_atomically(target: Path, write: Any) -> None:
    """Write a file or folder under a temporary name beside ``target`` and rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        if target.suffix:
            write(tmp / target.name)
            os.replace(tmp / target.name, target)
        else:
            write(str(tmp))
            try:
                tmp.rename(target)
            except OSError:  # another process won the race; its copy is as good
                if not target.exists():
                    raise
            else:
                return
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["convert_peft_lora", "gguf_path", "load_tokenizer", "lora_file"]
