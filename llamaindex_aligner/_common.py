"""Small pieces the adapters share: the error policy type, option checking, error descriptions, Aligner records,
chat messages as the core's history turns, the core's context items, and the postprocessor's inspector."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from aligner_core import Aligner
from aligner_core.inspector import Inspector, as_inspector

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


#: ``MessageRole`` values and the core's history roles (``chatbot``/``model`` are providers' names for the
#: assistant, ``developer`` for the system); tool and function messages are skipped.
ROLES = {
    "user": "user", "assistant": "assistant", "system": "system",
    "chatbot": "assistant", "model": "assistant", "developer": "system",
}


def history_turns(messages: Sequence[Any]) -> list[dict[str, str]]:
    """LlamaIndex ``ChatMessage`` objects as the core's ``history`` turns (text blocks joined).

    Tool and function results, and messages without text (an assistant turn that only calls tools),
    are skipped.
    """
    turns = []
    for message in messages:
        role = ROLES.get(getattr(message.role, "value", message.role))
        text = message.content or ""
        if role is not None and text.strip():
            turns.append({"role": role, "content": text})
    return turns


#: The inspector's verdict in a correction's metadata, repeated at the top of the details when present.
VERDICT_KEYS = ("inspector_score", "inspector_threshold", "inspector_passed")


def verdict(correction: Any) -> dict[str, Any]:
    """The inspector's verdict on a correction (empty when no inspector judged it)."""
    return {k: correction.metadata[k] for k in VERDICT_KEYS if k in correction.metadata}


def context_item(kind: str, content: str, name: str | None = None) -> dict[str, str]:
    """One item of the core's ``context=`` (``tool_call``, ``tool_result`` or ``document``)."""
    return {"type": kind, "content": content, **({"name": name} if name else {})}


def scorer(inspector: Any) -> Inspector:
    """The inspector as the core takes it. A plain callable may still be the first release's gate, which
    returned ``True`` for "needs correcting": a boolean answer is read that way (score 0 or 1), with a warning."""
    if isinstance(inspector, Inspector) or not callable(inspector):
        return as_inspector(inspector)  # an Inspector as it is; anything else raises a TypeError saying what to pass

    def score(question: str, text: str) -> Any:
        value = inspector(question, text)
        if isinstance(value, bool):
            warnings.warn(
                "an inspector returning True for 'needs correcting' is deprecated: return a score in [0, 1] "
                "where 1 means aligned (nodes scoring below threshold are corrected)",
                DeprecationWarning, stacklevel=2,
            )
            return 0.0 if value else 1.0
        return value

    return Inspector(score, name=getattr(inspector, "__name__", None) or type(inspector).__name__)
