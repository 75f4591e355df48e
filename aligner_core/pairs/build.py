"""Preference pairs for TRL's ``DPOTrainer`` from (question, upstream answer, correction) records.

The correction is ``chosen`` and the upstream answer ``rejected`` (the paper's weak-to-strong
bootstrapping). Pairs whose correction is unchanged or nearly so teach nothing and are dropped.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..correction import similarity
from ..errors import OutputExistsError
from ..jobs.jsonl import write_durably
from ..jobs.records import numbered

#: Standard (non-conversational) pairs: TRL concatenates prompt + chosen, so the prompt ends in a break.
DEFAULT_PROMPT_FORMAT = "{question}\n\n"
DEFAULT_MAX_SIMILARITY = 0.95


@dataclass
class PairStats:
    """What became of the records: written as pairs, or dropped and why."""

    records: int = 0
    written: int = 0
    unchanged: int = 0
    similar: int = 0
    invalid: int = 0

    @property
    def dropped(self) -> int:
        return self.unchanged + self.similar + self.invalid

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "dropped": self.dropped}

    def describe(self) -> str:
        """One line for the command line."""
        return (
            f"{self.written} pairs from {self.records} records; dropped {self.dropped} "
            f"({self.unchanged} unchanged, {self.similar} nearly unchanged, {self.invalid} invalid)"
        )


def make_pair(
    question: str,
    answer: str,
    correction: str,
    *,
    conversational: bool = False,
    system: str | None = None,
    prompt_format: str = DEFAULT_PROMPT_FORMAT,
) -> dict[str, Any]:
    """One DPO example: the correction is ``chosen``, the upstream answer ``rejected``.

    Conversational pairs hold message lists (TRL applies the model's chat template); standard
    pairs hold ``prompt_format`` filled with the question, and the two answers as plain text.
    """
    if conversational:
        prompt = [{"role": "system", "content": system}] if system else []
        prompt.append({"role": "user", "content": question})
        return {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": correction}],
            "rejected": [{"role": "assistant", "content": answer}],
        }
    text = re.sub(r"\{question\}", lambda _m: question, prompt_format)
    if system:
        text = f"{system}\n\n{text}"
    return {"prompt": text, "chosen": correction, "rejected": answer}


def classify(
    record: Mapping[str, Any],
    *,
    max_similarity: float = DEFAULT_MAX_SIMILARITY,
    question_field: str = "question",
    answer_field: str = "answer",
    correction_field: str = "correction",
) -> str:
    """``"keep"``, ``"unchanged"``, ``"similar"`` (similarity >= ``max_similarity``) or ``"invalid"``."""
    values = [record.get(k) for k in (question_field, answer_field, correction_field)]
    if not all(isinstance(v, str) and v.strip() for v in values):
        return "invalid"
    answer, correction = values[1].strip(), values[2].strip()  # type: ignore[union-attr]
    if answer == correction:
        return "unchanged"
    if similarity(answer, correction) >= max_similarity:
        return "similar"
    return "keep"


def pairs_from_records(
    records: Iterable[Mapping[str, Any] | Exception],
    *,
    max_similarity: float = DEFAULT_MAX_SIMILARITY,
    conversational: bool = False,
    system: str | None = None,
    prompt_format: str = DEFAULT_PROMPT_FORMAT,
    question_field: str = "question",
    answer_field: str = "answer",
    correction_field: str = "correction",
) -> tuple[list[dict[str, Any]], PairStats]:
    """Turn records into DPO pairs, dropping invalid, unchanged and nearly unchanged ones."""
    if not 0 < max_similarity <= 1:
        raise ValueError(f"max_similarity must be in (0, 1], got {max_similarity}")
    if "{question}" not in prompt_format:
        raise ValueError(f"prompt_format must contain {{question}}, got {prompt_format!r}")
    stats = PairStats()
    pairs = []
    for record in records:
        stats.records += 1
        if isinstance(record, Exception):
            stats.invalid += 1
            continue
        kind = classify(
            record,
            max_similarity=max_similarity,
            question_field=question_field,
            answer_field=answer_field,
            correction_field=correction_field,
        )
        if kind != "keep":
            setattr(stats, kind, getattr(stats, kind) + 1)
            continue
        pairs.append(
            make_pair(
                record[question_field],
                record[answer_field].strip(),
                record[correction_field].strip(),
                conversational=conversational,
                system=system,
                prompt_format=prompt_format,
            )
        )
        stats.written += 1
    return pairs, stats


def write_pairs(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    **options: Any,
) -> PairStats:
    """Read records from ``in_path`` (JSONL) and write DPO pairs to ``out_path`` (JSONL), atomically.

    ``options`` are those of :func:`pairs_from_records`. The file loads with
    ``datasets.load_dataset("json", data_files=out_path)`` and feeds ``trl.DPOTrainer`` as is.
    """
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists: pass --overwrite to replace it")
    pairs, stats = pairs_from_records((r for _, r in numbered(in_path)), **options)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write_durably(f, pairs)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return stats


__all__ = [
    "DEFAULT_MAX_SIMILARITY",
    "DEFAULT_PROMPT_FORMAT",
    "PairStats",
    "classify",
    "make_pair",
    "pairs_from_records",
    "write_pairs",
]
