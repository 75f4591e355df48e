"""How many new tokens a correction may take: never fewer than restating the answer needs.

A correction restates the answer with its edits, so a limit below the answer's own length cuts it off (a client's
small ``max_tokens`` used to do so, and the openai SDK's stream helper then raised ``LengthFinishReasonError``).
The limit is the answer's tokens plus headroom for edits, and never below ``--max-new-tokens``.

Counting is done in a worker thread, a slice at a time, and stops once the answer is past the Aligner's context:
a multi-megabyte answer neither stalls the event loop nor costs more than the context's worth of work before it
is refused. The Aligner's own preparation, on the event loop, then only ever sees answers that fit its context.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
from typing import Any

from aligner_core import Aligner
from aligner_core.errors import AlignerError, ContextOverflowError

logger = logging.getLogger("aligner_serve")

#: Tokens a correction may add to the answer it restates: a quarter more, and at least this many.
HEADROOM_MIN = 8
HEADROOM_SHARE = 0.25
#: Characters counted per call (so no single tokenizer call holds the GIL for long).
SLICE_CHARS = 16_384


def restating(answer_tokens: int) -> int:
    """Tokens needed to restate an answer of ``answer_tokens`` with room for edits."""
    return answer_tokens + max(HEADROOM_MIN, math.ceil(answer_tokens * HEADROOM_SHARE))


class TokenBudget:
    """The correction limit per answer, counted with the Aligner's tokenizer (a server's ``/tokenize`` when it has
    no local one; a conservative estimate from the UTF-8 size when neither is available)."""

    def __init__(self, aligner: Aligner) -> None:
        self.aligner = aligner
        self._tokenizer = _private_copy(getattr(aligner.engine, "tokenizer", None))
        self._server_counts = True  # False once the Aligner's server refused to tokenize

    @property
    def floor(self) -> int:
        """``--max-new-tokens``: the limit of a short answer's correction."""
        return int(self.aligner.defaults.max_new_tokens)

    async def limit(self, answer: str) -> int:
        """``max_new_tokens`` for the correction of ``answer``; ``ContextOverflowError`` when restating it cannot fit
        the Aligner's context (found without tokenizing more than a context's worth)."""
        context = self.aligner.engine.context_length
        tokens, counted = await asyncio.to_thread(self.count, answer, context)
        needed = restating(tokens)
        if counted and context is not None and tokens + needed > context:
            raise ContextOverflowError(
                f"the answer to correct is {'over ' if tokens > context else ''}{tokens} tokens; restating it needs "
                f"{needed} more, over the Aligner's context of {context} tokens: ask for a shorter answer "
                "(a lower max_tokens)"
            )
        return max(self.floor, needed)

    def count(self, text: str, stop_after: int | None = None) -> tuple[int, bool]:
        """``(tokens, counted)``: the tokens of ``text``, counted a slice at a time and stopping once past
        ``stop_after``; ``counted`` is False for an estimate."""
        encode = self._encoder()
        if encode is not None:
            total = 0
            try:
                for start in range(0, len(text), SLICE_CHARS):
                    total += len(encode(text[start : start + SLICE_CHARS]))
                    if stop_after is not None and total > stop_after:
                        break
                return total, True
            except AlignerError as exc:  # a server without /tokenize: estimate from now on
                logger.info(
                    "the Aligner's server cannot count tokens (%s); correction limits are estimated", exc
                )
                self._server_counts = False
        return math.ceil(len(text.encode("utf-8", "replace")) / 2), False

    def _encoder(self) -> Any:
        if self._tokenizer is not None:
            tokenizer = self._tokenizer
            return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
        engine = self.aligner.engine
        if engine.tokenizes_locally or self._server_counts:
            return lambda text: engine.encode(text, add_special_tokens=False)
        return None


def _private_copy(tokenizer: Any) -> Any:
    """A copy of the Aligner's tokenizer for counting in worker threads, so the counts never share the engine's
    tokenizer state (fast tokenizers refuse concurrent use while their settings change)."""
    if tokenizer is None:
        return None
    try:
        return copy.deepcopy(tokenizer)
    except Exception:  # pragma: no cover - a tokenizer that cannot be copied: use the engine's encode
        return None


__all__ = ["HEADROOM_MIN", "HEADROOM_SHARE", "TokenBudget", "restating"]
