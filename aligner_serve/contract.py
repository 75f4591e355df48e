"""The OpenAI response contract around corrections: ``finish_reason``, ``usage`` and ``logprobs`` describe the text
the client gets, never text it did not get.

- ``finish_reason`` is that of the text returned: the correction's where it replaced the upstream's text, the
  upstream's where its text passes through; the upstream's own is always in the choice's ``aligner`` field
  (``upstream_finish_reason``).
- ``usage`` counts what the client got: the upstream's prompt tokens, and as completion tokens the correction's
  (counted by the Aligner's tokenizer) for a corrected choice and the upstream's for a choice passed through. Where
  only some of ``n`` choices were corrected, a choice passed through counts an even share of the upstream's
  completion tokens (the upstream reports one total). The upstream's usage as it came and the Aligner's are in the
  top-level ``aligner`` field (``upstream_usage``, ``usage``).
- ``logprobs`` describe the upstream's tokens, so a corrected choice returns none (``logprobs: null``) and says so
  (``aligner.logprobs_dropped: true``); a choice passed through keeps the upstream's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aligner_core import Correction


@dataclass(frozen=True)
class Outcome:
    """What one choice returned. ``returned_tokens``: the correction's completion tokens where its text replaced the
    upstream's (None where the upstream's text is returned); the Aligner's tokens spent on the choice."""

    returned_tokens: int | None = None
    aligner_prompt_tokens: int = 0
    aligner_completion_tokens: int = 0

    @classmethod
    def of(cls, correction: Correction | None) -> Outcome:
        if correction is None:
            return cls()
        kept = not correction.metadata.get("skipped")
        return cls(
            correction.completion_tokens if kept else None,
            correction.prompt_tokens,
            correction.completion_tokens,
        )


def kept(correction: Correction) -> bool:
    """Whether a correction's text is returned (not when it came back unchanged for a reason, e.g. the inspector
    passed the answer or a structured correction did not validate)."""
    return not correction.metadata.get("skipped")


def contract_details(
    choice: Mapping[str, Any], correction: Correction | None, *, asked_logprobs: bool
) -> dict[str, Any]:
    """The contract's part of a choice's ``aligner`` field, read before the choice is rewritten."""
    details: dict[str, Any] = {"upstream_finish_reason": choice.get("finish_reason")}
    if correction is not None and kept(correction) and asked_logprobs:
        details["logprobs_dropped"] = True
    return details


def rewrite_choice(choice: dict[str, Any], correction: Correction) -> None:
    """A kept correction's finish reason in place of the upstream's, and no log probabilities or stop reason that
    described the upstream's text."""
    choice["finish_reason"] = correction.finish_reason
    if "logprobs" in choice:
        choice["logprobs"] = None
    if "stop_reason" in choice:  # vLLM: the stop string the upstream's text ended on
        choice["stop_reason"] = None


def client_usage(upstream: Any, outcomes: Iterable[Outcome]) -> Any:
    """``usage`` for what the client got (the upstream's as it came when no choice was replaced)."""
    outcomes = list(outcomes)
    if all(o.returned_tokens is None for o in outcomes):
        return upstream
    up = upstream if isinstance(upstream, Mapping) else {}
    prompt = _count(up.get("prompt_tokens"))
    share = _count(up.get("completion_tokens")) / max(1, len(outcomes))
    completion = round(sum(share if o.returned_tokens is None else o.returned_tokens for o in outcomes))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def aligner_usage(outcomes: Iterable[Outcome]) -> dict[str, int]:
    """What the Aligner spent on the request, all choices together."""
    outcomes = list(outcomes)
    prompt = sum(o.aligner_prompt_tokens for o in outcomes)
    completion = sum(o.aligner_completion_tokens for o in outcomes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def request_details(
    first: Mapping[str, Any], upstream_usage: Any, outcomes: Iterable[Outcome]
) -> dict[str, Any]:
    """The top-level ``aligner`` field: the first choice's details (as before ``n`` > 1 was served), the upstream's
    usage as it came, and the Aligner's usage over all choices."""
    return {**first, "usage": aligner_usage(outcomes), "upstream_usage": upstream_usage}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


__all__ = [
    "Outcome",
    "aligner_usage",
    "client_usage",
    "contract_details",
    "kept",
    "request_details",
    "rewrite_choice",
]
