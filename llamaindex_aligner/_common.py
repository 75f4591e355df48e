"""Small pieces both adapters share: the error policy type, option checking, error descriptions."""

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
