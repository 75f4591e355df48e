"""The answer as a draft: prompt lookup anchored to the answer being corrected, shared by the transformers engine's
drafting loop (``local/speculative.py``) and the llama.cpp engine's (``llamacpp/drafting.py``). No torch here, so the
llama.cpp engine needs none.
"""

from __future__ import annotations

from collections.abc import Sequence


class AnswerDrafter:
    """Proposes the continuation of ``reference`` after the longest n-gram the output ends with.

    Index every 1..``max_ngram``-gram of the answer, prefer a match at or after where the last accepted copy ended
    (answers repeat short n-grams).
    """

    def __init__(self, reference: Sequence[int], max_ngram: int = 3) -> None:
        self.reference = list(reference)
        self.max_ngram = max_ngram
        self.index: dict[tuple[int, ...], list[int]] = {}
        for n in range(1, max_ngram + 1):
            for end in range(n, len(self.reference) + 1):
                self.index.setdefault(tuple(self.reference[end - n : end]), []).append(end)
        self.cursor = 0

    def propose(self, output: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens of the answer that follow the end of ``output`` (empty when nothing matches)."""
        if k <= 0 or not self.reference:
            return []
        if not output:
            return self.reference[:k]
        for n in range(min(self.max_ngram, len(output)), 0, -1):
            ends = self.index.get(tuple(output[-n:]))
            if not ends:
                continue
            end = next((e for e in ends if e >= self.cursor), ends[0])
            draft = self.reference[end : end + k]
            if draft:
                return draft
        return []

    def accepted(self, output: Sequence[int]) -> None:
        """Move the cursor to just after the match of the output's last tokens."""
        for n in range(min(self.max_ngram, len(output)), 0, -1):
            ends = self.index.get(tuple(output[-n:]))
            if ends:
                self.cursor = next((e for e in ends if e >= self.cursor), ends[0])
                return


__all__ = ["AnswerDrafter"]
