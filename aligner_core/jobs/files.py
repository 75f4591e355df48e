"""Correct a file of records in chunks: streaming in (any format of ``aligner_core.records``, ``-`` for stdin),
durable and resumable out (JSON lines; ``-`` for stdout)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..context import context_of
from ..errors import EngineUnavailableError, InvalidInputError, OutputExistsError
from ..history import history_of
from ..progress import Progress, ProgressCallback, tracking
from .jsonl import chunked, open_resumable, write_durably
from .records import count_items, is_stdio, iter_items

if TYPE_CHECKING:
    from ..aligner import Aligner


@dataclass
class JobStats:
    """What a file run did: records read, skipped by resume, written, failed and changed."""

    skipped: int = 0
    written: int = 0
    failed: int = 0
    changed: int = 0
    read: int = 0
    #: Where the failed records are (``line 7``, ``row 3``), in input order.
    failed_at: list[str] = field(default_factory=list)

    def describe_failures(self, most: int = 10) -> str:
        """``line 3, line 9`` (the first ``most``, then how many more)."""
        shown = ", ".join(self.failed_at[:most])
        more = len(self.failed_at) - most
        return shown + (f" and {more} more" if more > 0 else "")

    @property
    def complete(self) -> bool:
        """Every record read has its output line (a run that wrote fewer must not report success)."""
        return self.skipped + self.written == self.read


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
    progress: ProgressCallback | Progress | None = None,
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

    One bar covers the file (records done, tokens, tok/s) and moves as tokens are generated;
    ``progress`` gets the same counts (a callback, or a ``Progress`` of yours to count into).
    """
    from tqdm.auto import tqdm

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    f, done = _open_output(out_path, resume=resume, overwrite=overwrite)
    stats = JobStats(skipped=done, read=done)
    with (
        f,
        tqdm(
            total=count_items(in_path),
            initial=stats.skipped,
            desc="Correcting",
            unit="rec",
            disable=not show_progress,
        ) as bar,
        tracking(progress, bar, total=bar.total, initial_rows=stats.skipped) as tracker,
    ):
        for chunk in chunked(_numbered(iter_items(in_path, skip=stats.skipped), stats), chunk_size):
            _run_chunk(
                aligner, chunk, f, stats, question_field, answer_field, output_field, generation, tracker
            )
            if on_chunk is not None:
                on_chunk(stats.skipped + stats.written)
    return stats


def _open_output(out_path: str | os.PathLike[str], *, resume: bool, overwrite: bool) -> tuple[Any, int]:
    """The output file, or standard output for ``-`` (JSON lines there, logs and progress on stderr)."""
    if is_stdio(out_path):
        if resume:
            raise ValueError("--resume needs an output file: standard output cannot be read back")
        return StdoutSink(), 0
    return open_resumable(out_path, resume=resume, overwrite=overwrite)


class StdoutSink:
    """Standard output as a run's output: UTF-8 JSON lines, flushed per chunk, never closed."""

    def __init__(self) -> None:
        self.stream = sys.stdout

    def write(self, text: str) -> int:
        buffer = getattr(self.stream, "buffer", None)
        if buffer is not None:
            buffer.write(text.encode("utf-8"))
        else:
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __enter__(self) -> StdoutSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


def _numbered(items: Iterator[Any], stats: JobStats) -> Iterator[tuple[Any, dict[str, Any] | Exception]]:
    """``(where, record)`` pairs, counting what was read so the run can prove it wrote a line for each."""
    for item in items:
        stats.read += 1
        yield item, item.record


def _run_chunk(
    aligner: Aligner,
    chunk: list[tuple[int, dict[str, Any] | Exception]],
    f: Any,
    stats: JobStats,
    qf: str,
    af: str,
    of: str,
    generation: dict[str, Any],
    progress: Progress,
) -> None:
    pairs: list[Any] = []
    for item, record in chunk:
        if isinstance(record, Exception):
            pairs.append(None)
        elif qf not in record or af not in record:
            missing_fields = [k for k in (qf, af) if k not in record]
            pairs.append(InvalidInputError(f"{item.where}: missing field(s) {missing_fields}"))
        else:
            try:  # the earlier turns ("history"/"chat_history") and the grounding ("context") ride along
                pairs.append(
                    {
                        "question": record[qf],
                        "answer": record[af],
                        "history": history_of(record),
                        "context": context_of(record),
                    }
                )
            except InvalidInputError as exc:
                pairs.append(InvalidInputError(f"{item.where}: {exc}"))
    todo = [i for i, p in enumerate(pairs) if isinstance(p, dict)]
    progress.update(
        rows=len(chunk) - len(todo)
    )  # records refused before the model (unreadable, fields missing)
    done = aligner.correct_batch(
        [pairs[i] for i in todo], return_exceptions=True, progress=progress, **generation
    )
    results: list[Any] = [p if not isinstance(p, dict) else None for p in pairs]
    for i, r in zip(todo, done):
        results[i] = r
    outage = next((i for i, r in enumerate(results) if isinstance(r, EngineUnavailableError)), None)
    if outage is not None:  # keep what came before it; the rest is retried by --resume
        _write(f, stats, chunk[:outage], results[:outage], of)
        raise results[outage]
    _write(f, stats, chunk, results, of)


def _write(f: Any, stats: JobStats, chunk: list[Any], results: list[Any], of: str) -> None:
    lines = []
    for (item, record), result in zip(chunk, results):
        if isinstance(record, Exception):
            result = record
            record = _position(item)
        if isinstance(result, Exception):
            stats.failed += 1
            stats.failed_at.append(item.where)
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
    record: dict[str, Any],
    of: str,
    *,
    text: str | None = None,
    stats: dict[str, Any] | None = None,
    error: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One output line, shared by every file job (local and Ray) so their files are alike: the input
    record plus ``of`` and the ``aligner`` stats, or ``of: null`` and ``aligner_error``."""
    if error is not None:
        return {**record, of: None, "aligner_error": error}
    return {**record, of: text, "aligner": stats}


__all__ = ["JobStats", "OutputExistsError", "correct_jsonl"]


def _position(item: Any) -> dict[str, Any]:
    """What stands in for an unreadable record: ``{"line": 7}`` for JSON lines, else ``{"record": "row 3"}``."""
    return {"line": item.line} if item.where.startswith("line ") else {"record": item.where}
