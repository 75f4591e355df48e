"""Answer-anchored drafting for the llama.cpp engine: how many tokens each sequence drafts, and from where.

A correction mostly copies the answer it corrects, so after the n-gram a sequence has just written, the answer's
next tokens are a good guess (prompt lookup anchored to the answer, as in LLMA "Inference with Reference"). One
``llama_decode`` verifies a draft of ``k`` tokens together with the sequence's pending token; the sequence keeps
the longest prefix equal to its own argmax plus one token of the model's.

How long a draft is worth verifying follows from two measurements rather than fixed constants:

- **what a decode costs** (:class:`CostModel`): on a CPU one token takes llama.cpp's matrix-vector path and two or
  more its matrix-matrix path, which then grows about linearly (measured: 9 ms for 1 token, 16 ms for 2, 37 ms for
  8, 122 ms for 32). Extra tokens are far from free on a CPU, and at 32 sequences a step is compute-bound.
- **how likely the next drafted token is accepted** (:class:`DraftState`): a per-sequence rate, updated by every
  verify and, while the sequence is not drafting, by a free *shadow* check (would a one-token draft have matched
  the token the model just produced?), so a sequence that stopped drafting notices when copying resumes.

Each step, :func:`plan_drafts` ranks every candidate draft token by its chance of acceptance (``p**j`` for the
``j``-th token of a sequence with acceptance ``p``) and keeps the prefix that saves the most time: an accepted token
is a later plain decode saved, a drafted one makes this decode bigger; no draft at all when none saves time. So
drafts grow while they are accepted (``p`` near 1: an unchanged answer is verified in a few long passes), shrink on
misses, and stop where they do not pay (a correction that departs from the answer, many sequences per step). A
sequence's draft may at most double from one verify to the next, so a lucky streak does not buy one long wasted
verify.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from ..drafts import AnswerDrafter

#: Acceptance assumed before a sequence has verified anything: corrections copy most of their answer.
PRIOR_ACCEPTANCE = 0.7
#: Weight of the prior, in verified tokens.
PRIOR_WEIGHT = 3.0
#: Each new observation discounts the older ones by this factor (a memory of roughly the last 10-20 tokens).
DECAY = 0.9
#: Decodes up to this many tokens fit the cost line (long prompt chunks say little about a verify's cost).
MAX_FIT_TOKENS = 128
#: A sequence explores (drafts although the cost model says it does not pay) only this likely to be accepted.
EXPLORE_ACCEPTANCE = 0.5
#: The first draft of a sequence, and where a sequence restarts after a miss, is at most this long.
FIRST_DRAFT = 4


class CostModel:
    """Seconds of one ``llama_decode`` of ``n`` tokens, learnt from the decodes the engine runs.

    Measured on a 2-core CPU with SmolLM2 Q4_1: 9 ms for 1 token, 16 ms for 2, 23 ms for 4, 37 ms for 8, 122 ms for
    32: a single token takes llama.cpp's matrix-vector path, two or more its matrix-matrix path, so the curve is not
    one line. The model keeps the fastest recent time of each size up to ``MAX_FIT_TOKENS`` and interpolates
    linearly between sizes (beyond the largest, along the last segment's slope). The fastest, because other jobs on
    the same cores only add time, in spikes of up to seconds, and the decisions depend on ratios of these times.
    Seeded by a short calibration (1 to 32 tokens) when the engine starts with drafting on.
    """

    def __init__(self, *, window: int = 16) -> None:
        self.window = window
        self._samples: dict[int, collections.deque[float]] = {}
        #: ``(n, seconds)`` points the prediction interpolates, by size; a guess until decodes are seen.
        self.points: list[tuple[int, float]] = [(1, 0.009), (2, 0.016), (32, 0.122)]
        self._seen = 0

    def observe(self, n: int, seconds: float) -> None:
        if n > MAX_FIT_TOKENS:
            return
        samples = self._samples.get(n)
        if samples is None:
            samples = self._samples[n] = collections.deque(maxlen=self.window)
        samples.append(seconds)
        self._seen += 1
        if self._seen % 8 == 0 or len(samples) == 1:
            self._refit()

    def _refit(self) -> None:
        points = sorted((n, min(v)) for n, v in self._samples.items())
        if len(points) < 2:
            return
        # A bigger decode is never cheaper: where a size's best time is above a bigger size's, the bigger one's
        # wins (noise only ever adds time, so the lower of the two is the truer).
        fixed: list[tuple[int, float]] = []
        for n, t in reversed(points):
            fixed.append((n, min(t, fixed[-1][1]) if fixed else t))
        self.points = fixed[::-1]

    def time(self, n: int) -> float:
        """Predicted seconds of a decode of ``n`` tokens."""
        points = self.points
        if n <= points[0][0]:
            return points[0][1] * max(n, 1) / points[0][0]
        for (n0, t0), (n1, t1) in zip(points, points[1:]):
            if n <= n1:
                return t0 + (t1 - t0) * (n - n0) / (n1 - n0)
        (n0, t0), (n1, t1) = points[-2], points[-1]
        return t1 + (t1 - t0) / (n1 - n0) * (n - n1)


class DraftState:
    """One sequence's acceptance estimate and how long its next draft may be."""

    def __init__(self, max_draft: int) -> None:
        self.max_draft = max_draft
        self.hits = PRIOR_ACCEPTANCE * PRIOR_WEIGHT
        self.trials = PRIOR_WEIGHT
        self.cap = FIRST_DRAFT

    @property
    def acceptance(self) -> float:
        """Estimated chance that the next drafted token is accepted, given the one before it was."""
        return self.hits / self.trials

    def verified(self, drafted: int, accepted: int) -> None:
        """A draft of ``drafted`` tokens was verified and its first ``accepted`` kept."""
        missed = 1 if accepted < drafted else 0
        self._observe(accepted, accepted + missed)
        if accepted == drafted:
            self.cap = min(self.max_draft, max(FIRST_DRAFT, 2 * drafted))
        else:
            self.cap = max(1, min(FIRST_DRAFT, 2 * accepted))

    def shadow(self, matched: bool) -> None:
        """A step without a draft: would a one-token draft have matched? (Free to check, keeps ``p`` current.)"""
        self._observe(1 if matched else 0, 1)

    def _observe(self, hits: int, trials: int) -> None:
        if trials <= 0:
            return
        keep = DECAY**trials
        self.hits = self.hits * keep + hits
        self.trials = self.trials * keep + trials


def plan_drafts(
    states: Sequence[tuple[DraftState, int] | None], fixed_tokens: int, cost: CostModel
) -> list[int]:
    """Draft lengths for one step: the draft tokens that save the most time, none when none saves any.

    ``states`` holds, per decoding sequence, its draft state and the most tokens it may draft (None: it does not
    draft); ``fixed_tokens`` are the step's tokens without drafts (one per decoding sequence, plus prompt chunks).
    The ``j``-th draft token of a sequence with acceptance ``p`` is accepted with chance ``p**j``, and an accepted
    token is one the sequence need not decode later, at the per-token cost of a plain step of this many sequences.
    Candidates are taken in order of that chance; the step keeps the prefix whose expected saving minus the extra
    time of the bigger decode is largest.
    """
    plain = len(states)
    candidates: list[tuple[float, int]] = []
    for i, entry in enumerate(states):
        if entry is None:
            continue
        state, room = entry
        p, worth = state.acceptance, 1.0
        for _ in range(min(room, state.cap, state.max_draft)):
            worth *= p
            if worth < 0.02:
                break
            candidates.append((worth, i))
    lengths = [0] * len(states)
    if not candidates or plain == 0:
        return lengths
    candidates.sort(key=lambda c: -c[0])
    per_token = cost.time(plain) / plain
    base = cost.time(fixed_tokens)
    best_saving, best_m, gained = 0.0, 0, 0.0
    for m, (worth, _) in enumerate(candidates, start=1):
        gained += worth
        saving = gained * per_token - (cost.time(fixed_tokens + m) - base)
        if saving > best_saving:
            best_saving, best_m = saving, m
    for _, i in candidates[:best_m]:
        lengths[i] += 1
    return lengths


class DraftPlanner:
    """:func:`plan_drafts` plus exploration: the cost of a size the engine never decodes is never re-measured.

    When drafts look unprofitable only because a verify of that size was once measured slow (another job held the
    cores during the calibration, say), plain decoding would go on forever. So after ``explore_every`` steps in a row
    without drafts, the sequence most likely to be accepted (at least ``EXPLORE_ACCEPTANCE``) drafts up to its cap
    once; its decode refreshes the cost of that size. At most one short verify in ``explore_every`` steps.
    """

    def __init__(self, cost: CostModel, *, explore_every: int = 32) -> None:
        self.cost = cost
        self.explore_every = explore_every
        self._plain_steps = 0

    def plan(self, states: Sequence[tuple[DraftState, int] | None], fixed_tokens: int) -> list[int]:
        lengths = plan_drafts(states, fixed_tokens, self.cost)
        if any(lengths):
            self._plain_steps = 0
            return lengths
        self._plain_steps += 1
        if self._plain_steps < self.explore_every:
            return lengths
        self._plain_steps = 0
        live = [
            (entry[0].acceptance, i) for i, entry in enumerate(states) if entry is not None and entry[1] > 0
        ]
        if live:
            acceptance, i = max(live)
            state, room = states[i]  # type: ignore[misc]
            if acceptance >= EXPLORE_ACCEPTANCE:
                lengths[i] = min(state.cap, room)
        return lengths


__all__ = ["AnswerDrafter", "CostModel", "DraftPlanner", "DraftState", "plan_drafts"]
