"""How many threads the llama.cpp engine decodes with, chosen by measuring on the machine as it is now.

llama.cpp's CPU backend splits each of the ~600 operations of a decode over its threads and waits for all of them
at the end of each (OpenMP barriers). On cores that other processes also use, a thread that loses its core for a
time slice stalls every barrier it is part of: on the 2-core machine this engine was built on, with two other jobs
running, one thread decoded a token in 12.5 ms and two threads in 36 ms, while on the quiet machine two threads took
7.3 ms and one 11.7 ms. Neither count wins everywhere, so the engine measures: every so often it runs a short
tournament, alternating the current count with a smaller one over a few decodes of the live workload (alternating
cancels out drift in the load), and keeps whichever decoded faster. Decodes of different sizes are compared through
the engine's cost model: each decode counts as its time over the time predicted for its size. Tournaments grow rarer while the
choice holds. An explicit ``n_threads`` (or ``$ALIGNER_CPU_THREADS``) turns this off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger("aligner_core.llamacpp")

#: Decodes per arm in one tournament (the two arms alternate).
ROUNDS = 4
#: Decodes between tournaments: the first gap, and the longest once the choice keeps holding.
FIRST_GAP, LONGEST_GAP = 32, 1024
#: The challenger must be this much faster per token to take over (noise is not a reason to switch).
MARGIN = 0.9


def candidates(most: int) -> list[int]:
    """Thread counts worth trying: ``most``, then halving down to one."""
    counts = [most]
    while counts[-1] > 1:
        counts.append(max(1, counts[-1] // 2))
    return counts


class ThreadTuner:
    """Alternates thread counts now and then and keeps the faster one (see the module docstring)."""

    def __init__(
        self, counts: list[int], apply: Callable[[int], None], predict: Callable[[int], float]
    ) -> None:
        """``apply(n)`` sets the count of the next decodes; ``predict(tokens)`` is the expected seconds of a decode
        of that size (the cost model), so decodes of different sizes compare."""
        self.counts = counts
        self.apply = apply
        self.predict = predict
        self.current = counts[0]
        self.gap = FIRST_GAP
        self._countdown = FIRST_GAP
        self._schedule: list[int] = []
        self._arms: dict[int, list[float]] = {}
        self._challenger_index = 1
        self._running = counts[0]

    def before_decode(self) -> None:
        """Set the thread count of the decode about to run."""
        if len(self.counts) < 2:
            return
        if not self._schedule:
            self._countdown -= 1
            if self._countdown <= 0:
                challenger = self.counts[self._challenger_index]
                self._schedule = [challenger, self.current] * ROUNDS
                self._arms = {challenger: [0.0, 0.0], self.current: [0.0, 0.0]}
        wanted = self._schedule[0] if self._schedule else self.current
        if wanted != self._running:
            self.apply(wanted)
            self._running = wanted

    def after_decode(self, tokens: int, seconds: float) -> None:
        """Record the decode just run; at the end of a tournament, keep the faster count."""
        if not self._schedule:
            return
        arm = self._arms[self._schedule.pop(0)]
        arm[0] += seconds / max(self.predict(tokens), 1e-6)
        arm[1] += 1
        if self._schedule:
            return
        challenger = self.counts[self._challenger_index]
        slowness = {n: total / max(count, 1) for n, (total, count) in self._arms.items()}
        if slowness[challenger] < MARGIN * slowness[self.current]:
            logger.info(
                "llama.cpp: %d threads decode faster than %d here now (%.2fx against %.2fx the expected time)",
                challenger,
                self.current,
                slowness[challenger],
                slowness[self.current],
            )
            self.current, self.gap = challenger, FIRST_GAP
        else:
            self.gap = min(LONGEST_GAP, self.gap * 2)
        others = [i for i, n in enumerate(self.counts) if n != self.current]
        self._challenger_index = (
            others[(others.index(self._challenger_index) + 1) % len(others)]
            if (self._challenger_index in others)
            else others[0]
        )
        self._countdown = self.gap


__all__ = ["ThreadTuner", "candidates"]
