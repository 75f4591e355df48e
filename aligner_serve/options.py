"""The ``aligner`` field of a chat-completions body: what one request asks of the correction.

It is this proxy's extension of the OpenAI request, so it is removed before the body goes upstream (OpenAI
rejects unknown fields). ``{"aligner": {"correct_structured": true}}`` corrects a structured answer (kept only
if it still parses and validates); ``false`` passes it through even where the server corrects by default.
Unknown options are a 400, so a misspelled option never goes silently unheeded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .bad_request import RequestShapeError

FIELD = "aligner"
_OPTIONS = ("correct_structured",)


@dataclass(frozen=True)
class AlignerOptions:
    """Per-request options; ``None`` leaves the server's setting."""

    correct_structured: bool | None = None


def read_options(body: Mapping[str, Any]) -> AlignerOptions:
    """The request's ``aligner`` options (all unset when the field is absent or null)."""
    raw = body.get(FIELD)
    if raw is None:
        return AlignerOptions()
    if not isinstance(raw, Mapping):
        raise RequestShapeError(f"'{FIELD}' must be an object, e.g. {{\"correct_structured\": true}}", param=FIELD)
    unknown = sorted(str(k) for k in raw if k not in _OPTIONS)
    if unknown:
        raise RequestShapeError(f"'{FIELD}' has unknown option(s) {', '.join(unknown)}; supported: "
                                f"{', '.join(_OPTIONS)}", param=f"{FIELD}.{unknown[0]}")
    value = raw.get("correct_structured")
    if value is not None and not isinstance(value, bool):
        raise RequestShapeError(f"'{FIELD}.correct_structured' must be true or false, got {value!r}",
                                param=f"{FIELD}.correct_structured")
    return AlignerOptions(correct_structured=value)


__all__ = ["FIELD", "AlignerOptions", "read_options"]
