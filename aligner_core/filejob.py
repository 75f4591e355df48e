"""Correct a JSONL file in chunks: streaming in, durable and resumable out."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AlignerError, InvalidInputError
from .jsonl import count_records, read_jsonl, resume_offset, write_durably

if TYPE_CHECKING:
    from .aligner import Aligner


class OutputExistsError(AlignerError, FileExistsError):
    """The output file exists and neither resume nor overwrite was asked for."""


@dataclass
class JobStats:
    """What a file run did: records skipped by resume, written, failed and changed."""

    skipped: int = 0
    written: int = 0
    failed: int = 0
    changed: int = 0


def correct_jsonl(
    aligner: Aligner,
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    output_field: str = "correction",
    resume: bool = False,
    overwrite: bool = False,
    chunk_size: int = 64,
    show_progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
    **generation: Any,
) -> JobStats:
    """Correct every record of ``in_path`` into ``out_path``, in input order.

    Each output line is the input record plus ``output_field`` (the corrected text) and an
    ``aligner`` object (changed, similarity, tokens, finish reason, latency). A record that cannot
    be corrected gets ``output_field: null`` and an ``aligner_error`` instead, so lines stay aligned
    with the input and nothing is silently dropped. ``resume`` skips records already in ``out_path``.
    """
    from tqdm.auto import tqdm

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    out = Path(out_path)
    if out.exists() and not (resume or overwrite):
        raise OutputExistsError(f"{out} exists: pass --resume to continue it or --overwrite to start again")
    stats = JobStats(skipped=resume_offset(out) if resume else 0)
    total = count_records(in_path)
    mode = "a" if resume else "w"
    with open(out, mode, encoding="utf-8") as f, tqdm(
        total=total, initial=stats.skipped, desc="Correcting", unit="rec", disable=not show_progress
    ) as bar:
        chunk: list[tuple[int, dict[str, Any] | Exception]] = []
        for item in read_jsonl(in_path, skip=stats.skipped):
            chunk.append(item)
            if len(chunk) >= chunk_size:
                _run_chunk(aligner, chunk, f, stats, question_field, answer_field, output_field, generation)
                bar.update(len(chunk))
                if on_chunk is not None:
                    on_chunk(stats.skipped + stats.written)
                chunk = []
        if chunk:
            _run_chunk(aligner, chunk, f, stats, question_field, answer_field, output_field, generation)
            bar.update(len(chunk))
            if on_chunk is not None:
                on_chunk(stats.skipped + stats.written)
    return stats


def _run_chunk(
    aligner: Aligner,
    chunk: list[tuple[int, dict[str, Any] | Exception]],
    f: Any,
    stats: JobStats,
    qf: str,
    af: str,
    of: str,
    generation: dict[str, Any],
) -> None:
    pairs: list[Any] = []
    for number, record in chunk:
        if isinstance(record, Exception):
            pairs.append(None)
        elif qf not in record or af not in record:
            missing_fields = [k for k in (qf, af) if k not in record]
            pairs.append(InvalidInputError(f"line {number}: missing field(s) {missing_fields}"))
        else:
            pairs.append((record[qf], record[af]))
    todo = [i for i, p in enumerate(pairs) if isinstance(p, tuple)]
    done = aligner.correct_batch([pairs[i] for i in todo], return_exceptions=True, **generation)
    results: list[Any] = [p if not isinstance(p, tuple) else None for p in pairs]
    for i, r in zip(todo, done):
        results[i] = r
    lines = []
    for (number, record), result in zip(chunk, results):
        if isinstance(record, Exception):
            result = record
            record = {"line": number}
        if isinstance(result, Exception):
            stats.failed += 1
            lines.append({**record, of: None, "aligner_error": {"type": type(result).__name__, "message": str(result)}})
            continue
        stats.changed += int(result.changed)
        info = result.to_dict()
        for k in ("question", "original", "text"):
            info.pop(k)
        lines.append({**record, of: result.text, "aligner": info})
    write_durably(f, lines)
    stats.written += len(lines)
