"""A squad of aligners, one per criterion, each gated by its own inspector (Ngweta et al., 2024).

Every inspector scores the answer; the aligner of the worst-scoring criterion that fails its threshold
corrects it; every inspector scores the new answer; repeat until all criteria pass or every aligner has been
applied once. A batch runs round by round: each round scores all live pairs in one batch per inspector and
sends each aligner the pairs it is to correct in one ``correct_batch`` call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .correction import Correction
from .errors import EmptyAnswerError, InvalidInputError
from .inspector import (
    DEFAULT_THRESHOLD,
    Inspector,
    ScoreFn,
    as_inspector,
    check_threshold,
    passes,
    question_answer,
)

Member = tuple[Inspector | ScoreFn, Any]


@dataclass
class _State:
    """One pair on its way through the squad."""

    pair: Any
    question: str
    original: str
    text: str
    scores: list[float] = field(default_factory=list)
    applied: set[int] = field(default_factory=set)
    steps: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    finish_reason: str = "stop"

    def step_pair(self) -> Any:
        """The pair as given, with the current text as its answer (a dict's other keys, a history, are kept)."""
        if isinstance(self.pair, Mapping):
            return {**self.pair, "answer": self.text}
        if isinstance(self.pair, (tuple, list)) and len(self.pair) == 3:
            return (self.question, self.text, self.pair[2])
        return (self.question, self.text)


class AlignerSquad:
    """Several ``(inspector, aligner)`` members applied worst criterion first, re-scoring after each.

    ``threshold`` is one number for every criterion or one per member; an answer passes a criterion
    when its score is at or above that threshold. ``names`` label the criteria in the result's metadata
    (default: the inspectors' names). The result is a ``Correction`` of the original answer whose
    ``metadata["squad"]`` lists the steps taken: criterion index and name, the scores of every criterion
    before and after the step, and whether the text changed; ``metadata["inspector_scores"]`` holds the
    final scores.
    """

    def __init__(
        self,
        members: Sequence[Member],
        *,
        threshold: float | Sequence[float] = DEFAULT_THRESHOLD,
        names: Sequence[str] | None = None,
    ) -> None:
        if isinstance(members, (str, bytes)) or not isinstance(members, Sequence) or not members:
            raise ValueError("members must be a non-empty list of (inspector, aligner) pairs")
        inspectors, aligners = [], []
        for i, member in enumerate(members):
            if not isinstance(member, (tuple, list)) or len(member) != 2:
                raise ValueError(f"member {i} must be an (inspector, aligner) pair, got {member!r}")
            inspector, aligner = member
            if not callable(getattr(aligner, "correct_batch", None)):
                raise TypeError(
                    f"member {i}: the aligner must have correct_batch (an Aligner), got {type(aligner).__name__}"
                )
            inspectors.append(as_inspector(inspector))
            aligners.append(aligner)
        self.inspectors: list[Inspector] = inspectors
        self.aligners: list[Any] = aligners
        if isinstance(threshold, Sequence) and not isinstance(threshold, (str, bytes)):
            if len(threshold) != len(members):
                raise ValueError(
                    f"threshold has {len(threshold)} values for {len(members)} members: give one or one each"
                )
            self.thresholds = [check_threshold(t) for t in threshold]
        else:
            self.thresholds = [check_threshold(threshold)] * len(members)
        self.names = list(names) if names is not None else [insp.name for insp in inspectors]
        if len(self.names) != len(members):
            raise ValueError(f"names has {len(self.names)} entries for {len(members)} members")

    def __repr__(self) -> str:
        return f"AlignerSquad(criteria={self.names!r}, thresholds={self.thresholds!r})"

    def __len__(self) -> int:
        return len(self.aligners)

    # -- public API ---------------------------------------------------------------------------

    def correct(self, question: str, answer: str, **generation: Any) -> Correction:
        """Run the squad on one answer; generation options go to every aligner."""
        return self.correct_batch([(question, answer)], **generation)[0]

    def correct_batch(self, pairs: Sequence[Any], **generation: Any) -> list[Correction]:
        """Run the squad on many pairs, round by round; input order is kept."""
        states = self._start(pairs)
        self._score(states, range(len(states)))
        while plan := self._plan(states):
            for c, idx in plan.items():
                outs = self.aligners[c].correct_batch([states[i].step_pair() for i in idx], **generation)
                self._apply(states, c, idx, outs)
            self._rescore(states, plan)
        return [self._finish(s) for s in states]

    async def acorrect(self, question: str, answer: str, **generation: Any) -> Correction:
        """Async :meth:`correct`."""
        return (await self.acorrect_batch([(question, answer)], **generation))[0]

    async def acorrect_batch(self, pairs: Sequence[Any], **generation: Any) -> list[Correction]:
        """Async :meth:`correct_batch`: scoring runs in worker threads, the aligners of one round run concurrently."""
        states = self._start(pairs)
        await asyncio.to_thread(self._score, states, range(len(states)))
        while plan := self._plan(states):
            calls: list[Awaitable[Sequence[Any]]] = [
                self._acorrect_batch(self.aligners[c], [states[i].step_pair() for i in idx], generation)
                for c, idx in plan.items()
            ]
            for (c, idx), outs in zip(plan.items(), await asyncio.gather(*calls)):
                self._apply(states, c, idx, outs)
            await asyncio.to_thread(self._rescore, states, plan)
        return [self._finish(s) for s in states]

    # -- the rounds ---------------------------------------------------------------------------

    @staticmethod
    def _acorrect_batch(
        aligner: Any, pairs: list[Any], generation: dict[str, Any]
    ) -> Awaitable[Sequence[Any]]:
        batch: Callable[..., Awaitable[Sequence[Any]]] | None = getattr(aligner, "acorrect_batch", None)
        if batch is not None:
            return batch(pairs, **generation)
        return asyncio.to_thread(aligner.correct_batch, pairs, **generation)

    def _start(self, pairs: Sequence[Any]) -> list[_State]:
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
            raise InvalidInputError(
                f"pairs must be a sequence of (question, answer) pairs, got {type(pairs).__name__}"
            )
        states = []
        for i, pair in enumerate(pairs):
            q, a = question_answer(pair, i)
            if not a.strip():
                raise EmptyAnswerError(
                    f"pair {i}: the answer is empty or whitespace: there is nothing to correct"
                )
            states.append(_State(pair, q, a, a))
        return states

    def _score(self, states: list[_State], which: Sequence[int] | range) -> None:
        """Score the pairs ``which`` under every criterion: one batch per inspector."""
        which = list(which)
        if not which:
            return
        per_criterion = [
            insp.score_batch([(states[i].question, states[i].text) for i in which])
            for insp in self.inspectors
        ]
        for k, i in enumerate(which):
            states[i].scores = [scores[k] for scores in per_criterion]

    def _plan(self, states: list[_State]) -> dict[int, list[int]]:
        """Which pairs each criterion's aligner corrects this round: each pair's worst failing criterion
        among those not applied yet (ties go to the earlier member)."""
        plan: dict[int, list[int]] = {}
        for i, s in enumerate(states):
            failing = [
                c
                for c in range(len(self.aligners))
                if c not in s.applied and not passes(s.scores[c], self.thresholds[c])
            ]
            if failing:
                worst = min(failing, key=lambda c: (s.scores[c], c))
                plan.setdefault(worst, []).append(i)
        return dict(sorted(plan.items()))

    def _apply(self, states: list[_State], c: int, idx: list[int], outs: Sequence[Any]) -> None:
        if len(outs) != len(idx):
            raise RuntimeError(f"aligner {c} returned {len(outs)} corrections for {len(idx)} pairs")
        for i, out in zip(idx, outs):
            s = states[i]
            if isinstance(out, BaseException):
                raise out
            s.applied.add(c)
            text = (
                out.text if out.text.strip() else s.text
            )  # an empty correction keeps the answer it was given
            s.steps.append(
                {
                    "criterion": c,
                    "name": self.names[c],
                    "scores_before": list(s.scores),
                    "changed": text.strip() != s.text.strip(),
                }
            )
            s.text = text
            s.prompt_tokens += out.prompt_tokens
            s.completion_tokens += out.completion_tokens
            s.latency_s += out.latency_s
            s.finish_reason = out.finish_reason

    def _rescore(self, states: list[_State], plan: dict[int, list[int]]) -> None:
        moved = sorted(i for idx in plan.values() for i in idx)
        self._score(states, moved)
        for i in moved:
            states[i].steps[-1]["scores_after"] = list(states[i].scores)

    def _finish(self, s: _State) -> Correction:
        metadata = {
            "squad": s.steps,
            "criteria": list(self.names),
            "inspected": True,
            "inspector_scores": list(s.scores),
            "inspector_thresholds": list(self.thresholds),
            "inspector_passed": not s.steps,
        }
        return Correction.build(
            question=s.question,
            original=s.original,
            text=s.text,
            prompt_tokens=s.prompt_tokens,
            completion_tokens=s.completion_tokens,
            finish_reason=s.finish_reason,  # type: ignore[arg-type]
            latency_s=s.latency_s,
            metadata=metadata,
        )


__all__ = ["AlignerSquad"]
