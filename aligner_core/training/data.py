"""Training records: load them (JSON, JSONL, CSV/Parquet, ``datasets``), check them, split them.

Everything here runs before any model is loaded, so a bad record fails in seconds, named by where
it came from (``line 7`` of a JSONL file, ``record 3`` of a list or JSON array, ``row 12`` of a
dataset), rather than after an hour of training.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..context import Context, context_of, normalize_context
from ..errors import AlignerError, InvalidInputError
from ..history import history_of, normalize_history
from ..jobs.records import RecordSourceError, iter_items

#: How many problems an error message lists before it says "and N more".
SHOWN = 10


class TrainingDataError(AlignerError, ValueError):
    """Training records are missing, malformed or do not fit; the message names the records."""


@dataclass(frozen=True)
class Record:
    """One training example: the upstream answer and its correction; ``where`` names its origin."""

    question: str
    answer: str
    correction: str
    where: str
    #: The conversation's earlier turns, ``((role, content), ...)``, from a ``chat_history``/``history`` field.
    history: tuple[tuple[str, str], ...] = ()
    #: What the answer was grounded on (tool calls and results, documents), from a ``context`` field.
    context: Context = ()


@dataclass(frozen=True)
class Fields:
    """Which record keys hold the question, the answer and the correction."""

    question: str = "question"
    answer: str = "answer"
    correction: str = "correction"


def problems_message(what: str, problems: Sequence[str]) -> str:
    """``what`` followed by the first problems, one a line, and how many more there are."""
    shown = "\n".join(f"  - {p}" for p in problems[:SHOWN])
    more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return f"{what} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n{shown}{more}"


def load_records(
    source: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    fields: Fields = Fields(),
    *,
    split: str = "train",
    config_name: str | None = None,
) -> list[Record]:
    """Load and check every record of ``source``; raise ``TrainingDataError`` listing all problems."""
    raw = list(iter_raw(source, split=split, config_name=config_name))
    if not raw:
        raise TrainingDataError(f"{_describe(source)} holds no records")
    records: list[Record] = []
    problems: list[str] = []
    for where, item in raw:
        result = check_record(item, where, fields)
        if isinstance(result, str):
            problems.append(result)
        else:
            records.append(result)
    if problems:
        raise TrainingDataError(
            problems_message(f"{_describe(source)} has records that cannot be trained on", problems)
        )
    return records


def check_record(item: Any, where: str, fields: Fields) -> Record | str:
    """The ``Record`` for a raw item, or a message saying what is wrong with it."""
    if isinstance(item, Exception):
        return str(item)
    if not isinstance(item, Mapping):
        return f"{where}: expected an object with {_names(fields)}, got {type(item).__name__}"
    absent = [k for k in (fields.question, fields.answer, fields.correction) if k not in item]
    if absent:
        present = ", ".join(sorted(map(str, item))) or "none"
        return f"{where}: missing field{'s' if len(absent) > 1 else ''} {', '.join(map(repr, absent))} (has: {present})"
    values = {k: item[k] for k in (fields.question, fields.answer, fields.correction)}
    wrong = [f"{k!r} is {type(v).__name__}" for k, v in values.items() if not isinstance(v, str)]
    if wrong:
        return f"{where}: fields must be strings: {', '.join(wrong)}"
    empty = [repr(k) for k in (fields.answer, fields.correction) if not values[k].strip()]
    if empty:
        return f"{where}: empty {' and '.join(empty)}: nothing to learn from"
    try:
        history = normalize_history(history_of(item), f"{where}: ")
        context = normalize_context(context_of(item), f"{where}: ")
    except InvalidInputError as exc:
        return str(exc)
    return Record(
        values[fields.question], values[fields.answer], values[fields.correction], where, history, context
    )


def iter_raw(
    source: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    *,
    split: str = "train",
    config_name: str | None = None,
) -> Iterable[tuple[str, Any]]:
    """Yield ``(where, raw item)`` for each record; unreadable lines yield an exception as the item.

    Files, folders and ``datasets`` names are read by the one loader every command uses (``aligner_core.jobs.records``).
    """
    if not isinstance(source, (str, os.PathLike)):
        if isinstance(source, (bytes, Mapping)) or not isinstance(source, Sequence):
            raise TrainingDataError(
                f"data must be a path, a dataset name or a list of dicts, got {type(source).__name__}"
            )
        yield from ((f"record {i}", item) for i, item in enumerate(source))
        return
    try:
        for item in iter_items(source, split=split, config_name=config_name):
            yield item.where, item.record
    except RecordSourceError as exc:
        raise TrainingDataError(str(exc)) from exc


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return "the data"


def _names(fields: Fields) -> str:
    return f"{fields.question!r}, {fields.answer!r} and {fields.correction!r}"


def split_eval(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """``(train, held_out)``: a seeded random ``fraction`` of the records is held out (at least one)."""
    if fraction <= 0:
        return list(records), []
    n_eval = max(1, round(len(records) * fraction))
    if n_eval >= len(records):
        raise TrainingDataError(
            f"eval_fraction={fraction} of {len(records)} records leaves nothing to train on: lower it or add records"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [
        r for i, r in enumerate(records) if i in held
    ]


def identity_slice(records: Sequence[Record], fraction: float, seed: int) -> list[Record]:
    """The identity warm-up records: a seeded random ``fraction`` of ``records`` as Q-A-A (correction := answer).

    The slice is drawn from the training records (never the held-out ones) and at least one record
    is taken when ``fraction > 0``; the Q-A-C stage still trains on all records.
    """
    if fraction <= 0 or not records:
        return []
    k = min(len(records), max(1, round(len(records) * fraction)))
    chosen = sorted(random.Random(seed + 1).sample(range(len(records)), k))
    return [
        replace(records[i], correction=records[i].answer, where=f"{records[i].where} (identity)")
        for i in chosen
    ]


__all__ = [
    "Fields",
    "Record",
    "TrainingDataError",
    "identity_slice",
    "iter_raw",
    "load_records",
    "split_eval",
]
