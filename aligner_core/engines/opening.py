"""Open an engine for a model, with the prompt template it expects: what ``Aligner.from_pretrained`` and
``Aligner.from_server`` do before they wrap the engine.

A model loaded here runs on the library's transformers engine, on llama.cpp (a GGUF, extra ``[llamacpp]``) or on
vLLM in this process, ``engine="auto"`` choosing between the first two (``choosing``); a served model is reached
through the server engine. The template is the one given, else the one the model records or implies
(``templates.choose_template``; a server's own choice for a served model), bound to the model's tokenizer when a
chat template needs one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from ..errors import missing
from ..templates import Template, bind, choose_template, resolve
from .base import Engine
from .choosing import canonical, choose_engine, llama_cpp_installed, transformers_only

logger = logging.getLogger("aligner_core")


def open_pretrained(
    model: str | os.PathLike[str],
    *,
    template: str | Template | None,
    engine: str | None,
    dtype: Any,
    device: str | None,
    device_map: Any,
    gguf_file: str | None,
    adapter: str | os.PathLike[str] | None,
    quantization: Any,
    trust_remote_code: bool,
    allow_pickle: bool,
    revision: str | None,
    max_batch_tokens: int | None,
    max_wait_ms: float,
    engine_kwargs: Mapping[str, Any],
) -> tuple[Engine, Template, str]:
    """``(engine, template, name)`` for a hub id, local directory or GGUF file (see ``Aligner.from_pretrained``).

    ``engine="auto"`` (or None) picks llama.cpp or transformers by ``choosing.choose_engine``."""
    name = canonical(engine)
    if name == "auto":
        name = choose_engine(
            model,
            gguf_file=gguf_file,
            device=device,
            device_map=device_map,
            quantization=quantization,
            dtype=dtype,
            adapter=adapter,
            max_batch_tokens=max_batch_tokens,
        )
    logger.info("running %s on the %s engine (engine=%r)", os.fspath(model), name, engine)
    if name == "vllm":
        if adapter is not None or device is not None or device_map is not None:
            raise ValueError(
                "adapter, device and device_map apply to engine='transformers'; merge the adapter "
                "first and let vLLM place the model (tensor_parallel_size=...)"
            )
        return _open_vllm(
            model,
            template=template,
            dtype=dtype,
            gguf_file=gguf_file,
            quantization=quantization,
            revision=revision,
            trust_remote_code=trust_remote_code,
            **engine_kwargs,
        )
    if name == "llama.cpp":
        wrong = transformers_only(
            device=device,
            device_map=device_map,
            quantization=quantization,
            dtype=dtype,
            max_batch_tokens=max_batch_tokens,
        )
        if wrong:
            raise ValueError(
                f"engine='llama.cpp' does not take {', '.join(wrong)}: the GGUF runs as quantized, on the CPU "
                "(n_gpu_layers=-1 offloads it in a GPU build of llama-cpp-python); use engine='transformers' for "
                "these options"
            )
        return open_llamacpp_pretrained(
            model,
            template=template,
            gguf_file=gguf_file,
            adapter=adapter,
            revision=revision,
            trust_remote_code=trust_remote_code,
            **engine_kwargs,
        )
    if engine_kwargs:
        raise TypeError(f"unexpected keyword argument(s) for engine='transformers': {sorted(engine_kwargs)}")
    from ..loading import load_model

    loaded, tokenizer, source = load_model(
        model,
        dtype=dtype,
        device=device,
        device_map=device_map,
        gguf_file=gguf_file,
        adapter=adapter,
        quantization=quantization,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        revision=revision,
    )
    chosen = template if template is not None else choose_template(source, tokenizer, adapter=adapter)
    return (
        open_local(loaded, tokenizer, max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms),
        bind(chosen, tokenizer),
        source.name,
    )


def _open_vllm(
    model: str | os.PathLike[str], *, template: str | Template | None, **options: Any
) -> tuple[Engine, Template, str]:
    from .vllm import VLLMEngine

    opened, source, tokenizer = VLLMEngine.from_pretrained(model, **options)
    chosen = template if template is not None else choose_template(source, tokenizer)
    return opened, bind(chosen, tokenizer), source.name


def open_llamacpp_pretrained(
    model: str | os.PathLike[str],
    *,
    template: str | Template | None,
    adapter: str | os.PathLike[str] | None = None,
    **options: Any,
) -> tuple[Engine, Template, str]:
    """``(engine, template, name)`` on llama.cpp: the GGUF as it is, the template chosen as for the other engines
    and bound to the same Hugging Face tokenizer (so the prompt ids are the same). ``MissingDependencyError``
    naming the ``[llamacpp]`` extra, before anything loads, when llama-cpp-python is not installed."""
    if not llama_cpp_installed():
        raise missing("llama-cpp-python", "llamacpp", 'engine="llama.cpp"')
    from .llamacpp import LlamaCppEngine

    opened, source, tokenizer = LlamaCppEngine.from_pretrained(model, adapter=adapter, **options)
    try:
        chosen = template if template is not None else choose_template(source, tokenizer, adapter=adapter)
        return opened, bind(chosen, tokenizer), source.name
    except BaseException:
        opened.close()
        raise


def open_local(model: Any, tokenizer: Any, **options: Any) -> Engine:
    """The transformers engine over a loaded model and tokenizer (``options``: its batching settings)."""
    from .local import TransformersEngine

    return TransformersEngine(model, tokenizer, **options)


def open_server(base_url: str, *, template: str | Template | None, **options: Any) -> tuple[Any, Template]:
    """``(engine, template)`` for an OpenAI-compatible server (see ``Aligner.from_server``); the engine is closed
    again when no template can be chosen."""
    from .server import ServerEngine

    opened = ServerEngine(base_url, **options)
    try:
        chosen = template if template is not None else opened.choose_template()
        return opened, (bind(chosen, opened.tokenizer) if opened.tokenizer is not None else resolve(chosen))
    except BaseException:
        opened.close()
        raise


__all__ = ["open_llamacpp_pretrained", "open_local", "open_pretrained", "open_server"]
