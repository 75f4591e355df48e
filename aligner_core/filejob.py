"""Correct a JSONL file in chunks: streaming in, durable and resumable out."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import EngineUnavailableError, InvalidInputError, OutputExistsError
from .jsonl import chunked, count_records, open_resumable, read_jsonl, write_durably

if TYPE_CHECKING:
    from .aligner import Aligner


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

    When the engine itself is unavailable (a server down or timing out after its retries), the
    records before the first such failure are written and ``EngineUnavailableError`` is raised:
    those rows are not marked failed, so ``resume`` corrects them once the engine is back.
    """
    from tqdm.auto import tqdm

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    f, done = open_resumable(out_path, resume=resume, overwrite=overwrite)
    stats = JobStats(skipped=done)
    with f, tqdm(
        total=count_records(in_path), initial=stats.skipped, desc="Correcting", unit="rec", disable=not show_progress
    ) as bar:
        for chunk in chunked(read_jsonl(in_path, skip=stats.skipped), chunk_size):
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
    outage = next((i for i, r in enumerate(results) if isinstance(r, EngineUnavailableError)), None)
    if outage is not None:  # keep what came before it; the rest is retried by --resume
        _write(f, stats, chunk[:outage], results[:outage], of)
        raise results[outage]
    _write(f, stats, chunk, results, of)


def _write(f: Any, stats: JobStats, chunk: list[Any], results: list[Any], of: str) -> None:
    lines = []
    for (number, record), result in zip(chunk, results):
        if isinstance(record, Exception):
            result = record
            record = {"line": number}
        if isinstance(result, Exception):
            stats.failed += 1
            lines.append(output_line(record, of, error=error_info(result)))
            continue
        stats.changed += int(result.changed)
        lines.append(output_line(record, of, text=result.text, stats=result.stats()))
    write_durably(f, lines)
    stats.written += len(lines)


def error_info(exc: BaseException) -> dict[str, str]:
    """The ``aligner_error`` object of a failed record."""
    return {"type": type(exc).__name__, "message": str(exc)}


def output_line(
    record: dict[str, Any], of: str, *, text: str | None = None, stats: dict[str, Any] | None = None,
    error: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One output line, shared by every file job (local and Ray) so their files are alike: the input
    record plus ``of`` and the ``aligner`` stats, or ``of: null`` and ``aligner_error``."""
    if error is not None:
        return {**record, of: None, "aligner_error": error}
    return {**record, of: text, "aligner": stats}


__all__ = ["JobStats", "OutputExistsError", "correct_jsonl"]
