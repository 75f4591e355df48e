"""What the adapters and ``aligner serve`` share about a correction: the role names of a conversation, the
details dict a correction reports, and the error policy, so each says the same thing the same way.

- :data:`ROLES`: a framework's message role (LangChain's ``human``/``ai``, LlamaIndex's ``chatbot``/``model``,
  OpenAI's ``developer``, ...) as the core's history role; tool and function roles have none (they are context).
- :func:`details`: a ``Correction`` as the dict an adapter attaches to its answer (``response_metadata["aligner"]``
  in LangChain, ``metadata["aligner"]`` in LlamaIndex), with the core's ``skipped`` reason and the inspector's
  verdict at the top, and the uncorrected answer left out unless asked for.
- :func:`failure_details`, :func:`raises`: ``on_error="passthrough"`` serves the original answer and records the
  error; a misspelled generation option always raises (a wiring mistake, not an outage).
"""

from __future__ import annotations

from typing import Any, Literal

from .correction import Correction
from .errors import GenerationOptionError

#: A framework's role name -> the core's history role (``user``, ``assistant``, ``system``).
ROLES: dict[str, str] = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "chatbot": "assistant",
    "model": "assistant",
    "system": "system",
    "developer": "system",
}

#: ``"raise"`` propagates the Aligner's errors; ``"passthrough"`` serves the uncorrected answer and records why.
OnError = Literal["raise", "passthrough"]

#: Keys of ``Correction.metadata`` repeated at the top of the details: the inspector's verdict and why an answer
#: passed through.
TOP_KEYS = ("inspector_score", "inspector_threshold", "inspector_passed", "skipped", "skipped_detail")


def role_of(name: Any) -> str | None:
    """The core's history role of a framework's role name (an enum's ``value`` too), or None (tool, function)."""
    return ROLES.get(getattr(name, "value", name))


def check_on_error(value: Any) -> OnError:
    """``value`` as an error policy, else ``ValueError`` saying what it may be."""
    if value not in ("raise", "passthrough"):
        raise ValueError(f"on_error must be 'raise' or 'passthrough', got {value!r}")
    return value  # type: ignore[no-any-return]


def raises(on_error: OnError, exc: BaseException) -> bool:
    """Whether a failure propagates under ``on_error`` (a misspelled generation option always does)."""
    return on_error == "raise" or isinstance(exc, GenerationOptionError) or not isinstance(exc, Exception)


def describe(exc: BaseException) -> str:
    """``'Type: message'``, the form errors take in details, events and logs."""
    return f"{type(exc).__name__}: {exc}"


def details(
    correction: Correction, *, model: str, include_original: bool = False, keep_text: bool = False
) -> dict[str, Any]:
    """A correction as an adapter reports it: ``model``, ``changed``, ``similarity``, tokens, ``finish_reason``,
    ``latency_s``, the core's ``metadata``, and at the top the verdict and ``skipped`` reason when there are any.

    The uncorrected answer (``original``) is left out unless ``include_original`` (or when nothing changed): the
    details travel with the answer (LangGraph state, agent event streams), and the text the Aligner replaced must
    not. ``keep_text`` keeps the corrected ``text`` (adapters whose answer object does not carry it)."""
    data = correction.to_dict()
    del data["question"]
    if not keep_text:
        del data["text"]
    if correction.changed and not include_original:
        del data["original"]
    top = {k: correction.metadata[k] for k in TOP_KEYS if k in correction.metadata}
    return {"model": model, **data, **top}


def failure_details(text: str | None, exc: BaseException, *, model: str) -> dict[str, Any]:
    """The details of an answer served uncorrected because the Aligner failed (``on_error="passthrough"``)."""
    return {
        "model": model,
        "original": text,
        "changed": False,
        "error": describe(exc),
        "error_type": type(exc).__name__,
    }


__all__ = [
    "ROLES",
    "TOP_KEYS",
    "OnError",
    "check_on_error",
    "describe",
    "details",
    "failure_details",
    "raises",
    "role_of",
]
