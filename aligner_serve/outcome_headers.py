"""The correction's outcome in response headers, for clients that drop the JSON fields they do not know (LangChain's
``ChatOpenAI`` keeps headers with ``include_response_headers=True``; the openai SDK with ``with_raw_response``).

- ``x-aligner-mode``: the mode the request ran in (``correct``, ``inspect``, ``off``); on every chat and
  corrections response, streamed ones included.
- ``x-aligner-changed`` (``true``/``false``), ``x-aligner-similarity`` (of the text returned to the upstream's,
  ``1.0`` where it passed through), ``x-aligner-skipped`` (the reason a choice passed through, ``none`` where it was
  corrected); with an inspector's verdict also ``x-aligner-inspector-score`` and ``x-aligner-inspector-passed``
  (``none`` for a choice without one). Each holds one value per choice, comma-separated in ``index`` order, so
  ``n=1`` gives a single value.

A streamed response sends its headers before its first byte, so it carries the outcome headers only where every
choice's outcome is known by then: mode ``off`` or ``inspect``, or every choice passing through (tool calls,
structured output, ...). Where a correction streams, only ``x-aligner-mode`` comes, and the final chunk's
``aligner`` field of each choice has the rest.

``Server-Timing`` (the W3C header browsers' developer tools show) splits the time before the response started:
``upstream`` (the upstream's whole answer) and ``aligner`` (the proxy's part after it: the corrections of a plain
response, up to the first corrected token of a stream), in milliseconds. It tells how much of a stream's time to
first token is the correction, measured in the same request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MODE = "x-aligner-mode"
CHANGED = "x-aligner-changed"
SIMILARITY = "x-aligner-similarity"
SKIPPED = "x-aligner-skipped"
INSPECTOR_SCORE = "x-aligner-inspector-score"
INSPECTOR_PASSED = "x-aligner-inspector-passed"
TIMING = "server-timing"


@dataclass(frozen=True)
class ChoiceOutcome:
    """What the headers say of one choice."""

    changed: bool = False
    similarity: float = 1.0
    skipped: str | None = None
    verdict: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, details: Mapping[str, Any]) -> ChoiceOutcome:
        """From a choice's ``aligner`` field (or a correction's JSON with its ``metadata``)."""
        meta = details.get("metadata") if isinstance(details.get("metadata"), Mapping) else {}
        verdict = details.get("inspector")
        if verdict is None and meta.get("inspected"):
            verdict = {"score": meta["inspector_score"], "passed": meta["inspector_passed"]}
        similarity = details.get("similarity", 1.0)
        return cls(
            changed=bool(details.get("changed", False)),
            similarity=float(similarity) if isinstance(similarity, (int, float)) else 1.0,
            skipped=details.get("skipped") or meta.get("skipped"),
            verdict=verdict,
        )


def outcome_headers(mode: str, outcomes: Iterable[ChoiceOutcome] | None) -> dict[str, str]:
    """The headers of a response in ``mode``; ``outcomes`` None where they are not known yet (a streamed
    correction): then only the mode."""
    headers = {MODE: mode}
    if outcomes is None:
        return headers
    outcomes = list(outcomes)
    if not outcomes:
        return headers
    headers[CHANGED] = ",".join("true" if o.changed else "false" for o in outcomes)
    headers[SIMILARITY] = ",".join(repr(round(o.similarity, 4)) for o in outcomes)
    headers[SKIPPED] = ",".join(_token(o.skipped) for o in outcomes)
    if any(o.verdict is not None for o in outcomes):
        headers[INSPECTOR_SCORE] = ",".join(
            "none" if o.verdict is None else repr(round(float(o.verdict["score"]), 4)) for o in outcomes
        )
        headers[INSPECTOR_PASSED] = ",".join(
            "none" if o.verdict is None else str(bool(o.verdict["passed"])).lower() for o in outcomes
        )
    return headers


def server_timing(upstream_s: float, aligner_s: float) -> dict[str, str]:
    """``Server-Timing`` with the upstream's and the proxy's part of the time before the response started."""
    return {TIMING: f"upstream;dur={1000 * upstream_s:.1f}, aligner;dur={1000 * aligner_s:.1f}"}


def _token(reason: Any) -> str:
    """A skip reason as a header value element (the core's reasons are ASCII words; anything else is ``other``)."""
    if not reason:
        return "none"
    text = str(reason)
    return text if text.isascii() and text.replace("_", "").isalnum() else "other"


__all__ = [
    "CHANGED",
    "INSPECTOR_PASSED",
    "INSPECTOR_SCORE",
    "MODE",
    "SIMILARITY",
    "SKIPPED",
    "TIMING",
    "ChoiceOutcome",
    "outcome_headers",
    "server_timing",
]
