"""Turn ``--judge M`` into a LangChain chat model: a local/hub transformers model, or ``provider:model``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..errors import TemplateError, missing

_PROVIDER = re.compile(r"^[a-z][a-z0-9_-]*:[^/\\]")


def is_provider_spec(spec: str) -> bool:
    """True for ``provider:model`` strings such as ``openai:gpt-4o`` (not a path, not a hub id)."""
    return bool(_PROVIDER.match(spec)) and not Path(spec).exists()


def load_chat_model(
    spec: str | os.PathLike[str],
    *,
    max_tokens: int = 64,
    device: str | None = None,
    dtype: Any = "auto",
    trust_remote_code: bool = False,
) -> Any:
    """A LangChain chat model for ``spec``.

    ``provider:model`` (``openai:gpt-4o``, ``anthropic:claude-...``) goes through LangChain's
    ``init_chat_model`` (needs the ``langchain`` package and the provider's package, temperature 0).
    Anything else is a hub id, local directory or GGUF file of a chat model with a chat template,
    loaded with transformers and run locally (greedy) as ``langchain_aligner.ChatTransformers``.
    """
    text = os.fspath(spec)
    if is_provider_spec(text):
        try:
            from langchain.chat_models import init_chat_model
        except ImportError as exc:
            raise missing("langchain", feature=f"the API judge {text!r} (provider:model)") from exc
        return init_chat_model(text, temperature=0, max_tokens=max_tokens)
    try:
        from langchain_aligner.local_chat import ChatTransformers
    except ImportError as exc:
        raise missing("langchain-core", "eval", feature="the LLM judge") from exc
    from ..loading import load_model

    model, tokenizer, source = load_model(
        text, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"{source.name!r} has no chat template, so it cannot be run as a chat judge: pass an instruct/chat model, "
            "or a reward model with --reward-model"
        )
    return ChatTransformers(
        model=model, tokenizer=tokenizer, model_name=source.name or text, max_tokens=max_tokens
    )


__all__ = ["is_provider_spec", "load_chat_model"]
