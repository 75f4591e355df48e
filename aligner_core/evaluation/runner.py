"""Evaluate a JSONL file of corrections: durable, resumable per-record verdicts, then the report."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..correction import similarity
from ..jobs.jsonl import chunked, open_resumable, read_jsonl, write_durably
from ..jobs.records import count_items, numbered
from ..progress import token_postfix
from .judges import Comparison, Judge, Verdict
from .metrics import EvalSummary, summarize
from .report import write_report

if TYPE_CHECKING:
    from ..aligner import Aligner

VERDICTS_FILE = "verdicts.jsonl"


@dataclass
class EvalResult:
    """What an evaluation run did and where it wrote it."""

    summary: EvalSummary
    verdicts_path: Path
    files: list[Path] = field(default_factory=list)
    skipped: int = 0
    written: int = 0
    failed: int = 0
    generated: int = 0


def evaluate_file(
    in_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    judge: Judge,
    *,
    aligner: Aligner | Callable[[], Aligner] | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    correction_field: str = "correction",
    resume: bool = False,
    overwrite: bool = False,
    chunk_size: int = 16,
    show_progress: bool = True,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    plots: bool = True,
    title: str = "Evaluation report",
    judge_unchanged: bool = False,
    **generation: Any,
) -> EvalResult:
    """Judge every record of ``in_path`` and write ``verdicts.jsonl`` and the report into ``out_dir``.

    Records hold ``question``, ``answer`` and optionally ``correction``; a record without one is
    corrected by ``aligner`` (an Aligner, or a function that loads one: called only if needed).
    Each verdict line is the input record plus ``correction`` and an ``eval`` object (``changed``,
    ``similarity``, ``judge``, ``verdicts`` per dimension); a record that cannot be evaluated gets
    an ``eval_error`` instead, so lines stay aligned with the input. A correction that left the
    answer unchanged is a tie on every dimension without asking the judge, unless
    ``judge_unchanged``. Chunks are written durably:
    ``resume`` continues a killed run and the report always covers the whole file.
    """
    from tqdm.auto import tqdm

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    if not isinstance(judge, Judge):
        raise TypeError(
            f"judge must implement the Judge protocol (name, dimensions, judge_batch), got {type(judge).__name__}"
        )
    out = Path(out_dir)
    verdicts = out / VERDICTS_FILE
    f, done = open_resumable(verdicts, resume=resume, overwrite=overwrite)
    result = EvalResult(summary=summarize([]), verdicts_path=verdicts)
    result.skipped = done
    fields = (question_field, answer_field, correction_field)
    holder: dict[str, Any] = {"aligner": aligner}

    def get_aligner() -> Aligner | None:
        value = holder["aligner"]
        if value is not None and not hasattr(value, "correct_batch"):
            holder["aligner"] = value = value()  # a loader: load the Aligner on first need
        return value

    with (
        f,
        tqdm(
            total=count_items(in_path),
            initial=result.skipped,
            desc="Judging",
            unit="rec",
            disable=not show_progress,
        ) as bar,
    ):
        for chunk in chunked(numbered(in_path, skip=result.skipped), chunk_size):
            _run_chunk(chunk, f, judge, get_aligner, fields, generation, result, bar, judge_unchanged)
    rows = (r for _, r in read_jsonl(verdicts) if isinstance(r, dict))
    result.summary = summarize(
        rows, judge=judge.name, n_resamples=n_resamples, confidence=confidence, seed=seed
    )
    result.files = [verdicts, *write_report(result.summary, out, title=title, plots=plots)]
    return result


def _run_chunk(
    chunk: list[tuple[int, dict[str, Any] | Exception]],
    f: Any,
    judge: Judge,
    get_aligner: Callable[[], Aligner | None],
    fields: tuple[str, str, str],
    generation: dict[str, Any],
    result: EvalResult,
    bar: Any,
    judge_unchanged: bool,
) -> None:
    qf, af, cf = fields
    rows: list[dict[str, Any]] = []
    errors: list[Exception | None] = []
    to_correct: list[int] = []
    for number, record in chunk:
        error: Exception | None = None
        if isinstance(record, Exception):
            error, record = record, {"line": number}
        elif qf not in record or af not in record:
            error = ValueError(f"line {number}: missing field(s) {[k for k in (qf, af) if k not in record]}")
        elif not isinstance(record[qf], str) or not isinstance(record[af], str) or not record[af].strip():
            error = ValueError(f"line {number}: {qf!r} and {af!r} must be strings and the answer non-empty")
        elif record.get(cf) is None:
            to_correct.append(len(rows))
        elif not isinstance(record[cf], str):
            error = ValueError(f"line {number}: {cf!r} must be a string, got {type(record[cf]).__name__}")
        rows.append(dict(record))
        errors.append(error)
    if to_correct:
        aligner = get_aligner()
        if aligner is None:
            for i in to_correct:
                errors[i] = ValueError(f"record has no {cf!r} and no Aligner was given to produce one")
        else:
            bar.set_description("Correcting")
            done = aligner.correct_batch(
                [(rows[i][qf], rows[i][af]) for i in to_correct],
                return_exceptions=True,
                progress=token_postfix(bar),
                **generation,
            )
            bar.set_description("Judging")
            for i, fix in zip(to_correct, done):
                if isinstance(fix, Exception):
                    errors[i] = fix
                    continue
                rows[i][cf], rows[i]["aligner"] = fix.text, fix.stats()
                result.generated += 1
    live = [i for i, e in enumerate(errors) if e is None]
    unchanged = (
        {i for i in live if rows[i][cf].strip() == rows[i][af].strip()} if not judge_unchanged else set()
    )
    asked = [i for i in live if i not in unchanged]
    bar.update(len(chunk) - len(asked))
    items = [Comparison(rows[i][qf], rows[i][af], rows[i][cf]) for i in asked]
    verdicts = dict(zip(asked, judge.judge_batch(items, on_result=lambda _i: bar.update(1))))
    same = {d: Verdict("tie", extra={"unchanged": True}) for d in judge.dimensions}
    for i in live:
        original, correction = rows[i][af], rows[i][cf]
        rows[i]["eval"] = {
            "changed": correction.strip() != original.strip(),
            "similarity": round(similarity(original.strip(), correction.strip()), 6),
            "judge": judge.name,
            "verdicts": {d: v.to_dict() for d, v in verdicts.get(i, same).items()},
        }
    for i, error in enumerate(errors):
        if error is not None:
            rows[i]["eval_error"] = {"type": type(error).__name__, "message": str(error)}
            result.failed += 1
    write_durably(f, rows)
    result.written += len(rows)


__all__ = ["VERDICTS_FILE", "EvalResult", "evaluate_file"]
