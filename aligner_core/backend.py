"""The seam between the Aligner facade and whatever runs the model.

The facade renders templates, validates input and builds ``Correction`` objects; a backend only
turns token prompts into generated text. The local transformers backend lives in ``engine.py``;
a remote engine (vLLM or SGLang over the OpenAI API) would implement the same protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol, runtime_checkable

from .correction import FinishReason
from .errors import GenerationOptionError


@dataclass(frozen=True)
class GenerationParams:
    """Decoding options shared by a call. Greedy unless ``do_sample=True``."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    #: Draft from the answer and verify in one pass (greedy only; identical output, fewer passes).
    speculative: bool = True
    #: Tokens proposed per step and row before adapting to the acceptance rate.
    num_draft_tokens: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise GenerationOptionError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature <= 0:
            raise GenerationOptionError(f"temperature must be > 0, got {self.temperature!r} (use do_sample=False for greedy)")
        if not 0 < self.top_p <= 1:
            raise GenerationOptionError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise GenerationOptionError(f"top_k must be >= 0 (0 disables it), got {self.top_k!r}")
        if self.repetition_penalty <= 0:
            raise GenerationOptionError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not isinstance(self.num_draft_tokens, int) or self.num_draft_tokens < 0:
            raise GenerationOptionError(f"num_draft_tokens must be an integer >= 0, got {self.num_draft_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationOptionError(f"stop must be a list of non-empty strings, got {self.stop!r}")

    @property
    def drafting(self) -> bool:
        """Whether answer-anchored drafting applies: it is exact only for plain greedy decoding."""
        return self.speculative and self.num_draft_tokens > 0 and not self.do_sample and self.repetition_penalty == 1.0

    def updated(self, options: Mapping[str, Any]) -> GenerationParams:
        """A copy with ``options`` applied; unknown names raise ``GenerationOptionError``."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise GenerationOptionError(
                f"unknown generation option(s) {unknown}; known: {sorted(known)}"
            )
        values = dict(options)
        if "stop" in values:
            stop = values["stop"]
            values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return replace(self, **values)


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete. ``reserve`` is the number of new tokens to plan memory for;
    ``draft_ids`` is the text the output is expected to copy from (the answer being corrected)."""

    prompt: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    reserve: int
    draft_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenerationOutput:
    """What a backend produced for one request."""

    text: str
    completion_tokens: int
    finish_reason: FinishReason
    latency_s: float
    metadata: Mapping[str, Any] = field(default_factory=dict)


ResultCallback = Callable[[int, "GenerationOutput | BaseException"], None]


@runtime_checkable
class Backend(Protocol):
    """What the Aligner facade needs from an engine."""

    #: Longest prompt + completion the model accepts, in tokens (None when unknown).
    context_length: int | None

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: GenerationParams,
        *,
        fail_fast: bool = True,
        on_result: ResultCallback | None = None,
    ) -> list[GenerationOutput | BaseException]:
        """Complete every request; results in request order.

        With ``fail_fast`` the first failure is raised; otherwise the exception takes the failed
        requests' places and the others still complete. ``on_result`` is called as each finishes.
        """
        ...
