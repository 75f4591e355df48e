"""The ``aligner`` field of a chat-completions body: what one request asks of the correction.

It is this proxy's extension of the OpenAI request, so it is removed before the body goes upstream (OpenAI
rejects unknown fields). ``{"aligner": {"correct_structured": true}}`` corrects a structured answer (kept only
if it still parses and validates); ``false`` passes it through even where the server corrects by default.
``{"aligner": {"mode": "off"}}`` (or ``"inspect"``, ``"correct"``) asks for another mode than the key's, as the
``x-aligner-mode`` header does; whether the key may is ``policy``'s call. Unknown options are a 400, so a
misspelled option never goes silently unheeded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .bad_request import RequestShapeError
from .config import MODES

FIELD = "aligner"
#: The options of a chat request's field (``/v1/corrections`` takes ``mode`` only).
CHAT_OPTIONS = ("correct_structured", "mode")


@dataclass(frozen=True)
class AlignerOptions:
    """Per-request options; ``None`` leaves the server's setting (or the key's mode)."""

    correct_structured: bool | None = None
    mode: str | None = None


def read_options(body: Mapping[str, Any], supported: tuple[str, ...] = CHAT_OPTIONS) -> AlignerOptions:
    """The request's ``aligner`` options (all unset when the field is absent or null)."""
    raw = body.get(FIELD)
    if raw is None:
        return AlignerOptions()
    if not isinstance(raw, Mapping):
        raise RequestShapeError(f'\'{FIELD}\' must be an object, e.g. {{"mode": "off"}}', param=FIELD)
    unknown = sorted(str(k) for k in raw if k not in supported)
    if unknown:
        raise RequestShapeError(
            f"'{FIELD}' has unknown option(s) {', '.join(unknown)}; supported: {', '.join(supported)}",
            param=f"{FIELD}.{unknown[0]}",
        )
    value = raw.get("correct_structured")
    if value is not None and not isinstance(value, bool):
        raise RequestShapeError(
            f"'{FIELD}.correct_structured' must be true or false, got {value!r}",
            param=f"{FIELD}.correct_structured",
        )
    mode = raw.get("mode")
    if mode is not None and (not isinstance(mode, str) or mode.strip().lower() not in MODES):
        raise RequestShapeError(
            f"'{FIELD}.mode' must be one of {', '.join(MODES)}, got {mode!r}", param=f"{FIELD}.mode"
        )
    return AlignerOptions(correct_structured=value, mode=mode)


__all__ = ["CHAT_OPTIONS", "FIELD", "AlignerOptions", "read_options"]
