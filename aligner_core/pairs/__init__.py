"""Bootstrap preference data: (question, upstream answer, correction) -> DPO pairs for the upstream model.

See docs/evaluation.md. ``import aligner_core.pairs`` is cheap: models load only in a generating round.
"""

from __future__ import annotations

from .build import (
    DEFAULT_MAX_SIMILARITY,
    DEFAULT_PROMPT_FORMAT,
    PairStats,
    classify,
    make_pair,
    pairs_from_records,
    write_pairs,
)
from .generate import RoundResult, TransformersUpstream, Upstream, generate_round, iter_prompts

__all__ = [
    "DEFAULT_MAX_SIMILARITY",
    "DEFAULT_PROMPT_FORMAT",
    "PairStats",
    "RoundResult",
    "TransformersUpstream",
    "Upstream",
    "classify",
    "generate_round",
    "iter_prompts",
    "make_pair",
    "pairs_from_records",
    "write_pairs",
]
