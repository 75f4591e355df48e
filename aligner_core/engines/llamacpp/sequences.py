"""What the llama.cpp worker tracks per request: the queued :class:`Job`, the admitted :class:`Running` (its
slot, how far its prompt is read, what it generated, its drafting state), the worker's :class:`Stats`, and
:func:`sample`, the one-token pick for sampled or penalized requests (greedy ones are an ``argmax`` in the worker).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..base import GenerationOutput, GenerationParams, GenerationRequest, TextSink
from .drafting import AnswerDrafter, DraftState

if TYPE_CHECKING:
    from ...progress import Progress


@dataclass
class Job:
    """One request on its way through the worker."""

    request: GenerationRequest
    prompt: list[int]
    params: GenerationParams
    draft: bool
    future: Future[GenerationOutput] = field(default_factory=Future)
    on_text: TextSink | None = None
    progress: Progress | None = None
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class Stats:
    """What the worker did, for tests and benchmarks: decodes run and how many sequences shared them."""

    decodes: int = 0
    decoded_tokens: int = 0
    max_sequences: int = 0
    #: decodes by the number of sequences in them
    sequences: collections.Counter[int] = field(default_factory=collections.Counter)


class Running:
    """An admitted job: its slot (llama.cpp sequence id), how far its prompt is read, what it generated."""

    def __init__(self, job: Job, slot: int, reserved: int, max_draft: int) -> None:
        self.job = job
        self.slot = slot
        self.reserved = reserved
        self.read = 0  # prompt tokens already in the KV cache
        self.n_past = 0  # tokens in the KV cache
        self.tokens: list[int] = []
        self.pending: int | None = None  # the last generated token, not yet in the KV cache
        self.drafter = AnswerDrafter(job.request.draft_ids) if job.draft else None
        self.state = DraftState(max_draft) if job.draft else None
        self.proposed = self.accepted = self.steps = 0
        self.shown = ""
        params = job.params
        self.rng = np.random.default_rng(params.seed) if params.do_sample else None
        self.penalized = params.repetition_penalty != 1.0
        self.history: list[int] = list(job.prompt) if self.penalized else []

    def pick(self, row: int, greedy: list[int], logits: np.ndarray | None) -> int:
        """The next token from this step's logits row: the argmax for greedy requests, else :func:`sample`."""
        if self.rng is None and not self.penalized:
            return greedy[row]
        assert logits is not None
        return sample(logits[row], self.job.params, self.history, self.rng)

    def output(
        self, decode: Callable[[Sequence[int]], str], is_eos: Callable[[int], bool]
    ) -> GenerationOutput:
        """The finished request: its text (cut at a stop string), finish reason and drafting counts."""
        job = self.job
        tokens = self.tokens
        finish = "stop" if tokens and is_eos(tokens[-1]) else "length"
        text = decode(tokens[:-1] if finish == "stop" else tokens)
        cut = min((p for p in (text.find(s) for s in job.params.stop) if p >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        metadata: dict[str, Any] = {"decode_steps": self.steps}
        if self.state is not None:
            rate = self.accepted / self.proposed if self.proposed else 0.0
            metadata.update(
                speculative=True,
                draft_tokens=self.proposed,
                accepted_draft_tokens=self.accepted,
                acceptance_rate=round(rate, 4),
            )
        return GenerationOutput(
            text=text.strip(),
            completion_tokens=len(tokens),
            finish_reason=finish,  # type: ignore[arg-type]
            latency_s=time.perf_counter() - job.submitted,
            metadata=metadata,
            prompt_tokens=len(job.prompt),
        )


def sample(
    row: np.ndarray, params: GenerationParams, history: Sequence[int], rng: np.random.Generator | None
) -> int:
    """One token from a row of logits: repetition penalty (as transformers applies it), then greedy or
    temperature / top-k / top-p sampling."""
    logits = np.array(row, dtype=np.float64)
    if params.repetition_penalty != 1.0 and history:
        seen = np.unique(np.asarray(history, dtype=np.int64))
        values = logits[seen]
        logits[seen] = np.where(
            values < 0, values * params.repetition_penalty, values / params.repetition_penalty
        )
    if not params.do_sample or rng is None:
        return int(logits.argmax())
    logits /= params.temperature
    if params.top_k and params.top_k < logits.size:
        kth = np.partition(logits, -params.top_k)[-params.top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        drop = order[cumulative - probs[order] >= params.top_p]
        probs[drop] = 0.0
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


__all__ = ["Job", "Running", "Stats", "sample"]
