"""The base model and tokenizer for training, LoRA wrapping, and merging an adapter into its base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .config import TrainConfig, TrainConfigError


def resolve_base(config: TrainConfig) -> str:
    """A location ``from_pretrained`` reads: a directory (GGUF files are dequantized once) or a hub id."""
    from ..loading import dequantize_gguf, resolve_source

    source = resolve_source(config.base_model)
    if source.kind == "gguf":
        return str(dequantize_gguf(source, trust_remote_code=config.trust_remote_code))
    if source.kind == "hub" and source.gguf_file:
        raise ModelLoadError(
            "training from a GGUF file on the hub is not supported: download it and pass the file"
        )
    return source.location


def load_tokenizer(location: str, config: TrainConfig) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the tokenizer of {config.base_model!r}: {exc}") from exc


def load_base_model(location: str, config: TrainConfig, *, bf16: bool) -> Any:
    """The base model in the dtype ``config.dtype`` asks for (``auto``: float32, or bf16 under LoRA + bf16).

    Full fine-tuning keeps float32 master weights (bf16 is then autocast mixed precision); a frozen
    LoRA base needs no float32 copy.
    """
    import torch
    from transformers import AutoModelForCausalLM

    name = config.dtype
    if name == "auto":
        name = "bfloat16" if (config.lora and bf16) else "float32"
    kwargs: dict[str, Any] = {"dtype": getattr(torch, name), "trust_remote_code": config.trust_remote_code}
    if not config.allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        return AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        hint = "" if config.allow_pickle else " (only safetensors weights load unless allow_pickle=True)"
        raise ModelLoadError(f"could not load base model {config.base_model!r}{hint}: {exc}") from exc


def wrap_lora(model: Any, config: TrainConfig) -> Any:
    """``model`` with a fresh LoRA adapter (peft) on ``config.lora_target_modules``."""
    from peft import LoraConfig, get_peft_model

    targets: Any = config.lora_target_modules.strip()
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    peft_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        wrapped = get_peft_model(model, peft_config)
    except ValueError as exc:
        raise TrainConfigError(
            f"lora_target_modules={config.lora_target_modules!r} does not fit this model: {exc}"
        ) from exc
    if config.gradient_checkpointing:
        wrapped.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return wrapped


def merge_adapter(
    model: Any, base_location: str | None, adapter: Path, out: Path, tokenizer: Any, config: TrainConfig
) -> None:
    """Save base + adapter merged into ``out``. The base is reloaded from disk in its own dtype when it
    can be (so merging works after any distributed run); a model passed in as an object is merged in memory."""
    if base_location is not None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(
            base_location,
            dtype="auto",
            trust_remote_code=config.trust_remote_code,
            **({} if config.allow_pickle else {"use_safetensors": True}),
        )
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    else:
        merged = model.merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


__all__ = ["load_base_model", "load_tokenizer", "merge_adapter", "resolve_base", "wrap_lora"]
