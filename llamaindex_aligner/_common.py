"""Small pieces the adapters share: the error policy type, option checking, error descriptions, Aligner records."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from aligner_core import Aligner

#: ``"raise"`` propagates the Aligner's errors; ``"passthrough"`` serves the uncorrected text (same as LangChain's).
OnError = Literal["raise", "passthrough"]


def check_options(aligner: Aligner, options: Mapping[str, Any]) -> None:
    """Fail now, not mid-query, on a misspelled or invalid generation option (``on_overflow`` is per call too)."""
    overflow = options.get("on_overflow", "error")
    if overflow not in ("error", "truncate"):
        raise ValueError(f"on_overflow must be 'error' or 'truncate', got {overflow!r}")
    aligner.defaults.updated({k: v for k, v in options.items() if k != "on_overflow"})


def describe(exc: BaseException) -> str:
    """``'Type: message'``, the form errors take in events and metadata."""
    return f"{type(exc).__name__}: {exc}"


def aligner_spec(aligner: Aligner) -> dict[str, str]:
    """What a serialized component records of its Aligner: enough to reload a hub model, not the weights."""
    return {"model": aligner.name, "template": aligner.template.name, "engine": aligner.engine.name}


def load_aligner(spec: Mapping[str, Any] | None, owner: str) -> Aligner:
    """Reload the Aligner a dict recorded (``from_dict`` without ``aligner=``), or say how to pass one."""
    hint = f"pass the Aligner back: {owner}.from_dict(data, aligner=aligner)"
    if not spec or not spec.get("model"):
        raise ValueError(f"the dict records no Aligner model to load; {hint}")
    engine = spec.get("engine", "transformers")
    if engine not in ("transformers", "vllm"):
        raise ValueError(f"an Aligner on the {engine!r} engine cannot be reloaded from its name; {hint}")
    try:
        return Aligner.from_pretrained(spec["model"], template=spec.get("template"), engine=engine)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not reload the Aligner {spec['model']!r} ({exc}); {hint}") from exc
