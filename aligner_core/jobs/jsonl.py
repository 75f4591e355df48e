"""Durable, resumable JSONL output for long correction runs.

Records are written in input order, one finished chunk at a time, each chunk flushed and fsynced.
A killed run leaves at most one partial last line; ``resume_offset`` drops it and says how many
input records are already done, so a resumed run neither loses nor duplicates a record.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from ..errors import OutputExistsError, OutputPathError
from .records import json_lines

T = TypeVar("T")


def read_jsonl(
    path: str | os.PathLike[str], *, skip: int = 0
) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    """Yield ``(line_number, record)`` for each non-blank line after the first ``skip`` records.

    A line that is not a JSON object yields a ``ValueError`` naming the line instead of stopping the run.
    (Inputs of any format go through ``aligner_core.records``; this reads the library's own JSONL outputs.)
    """
    with open(path, encoding="utf-8") as f:
        for item in json_lines(f):
            if item.number > skip:
                yield item.line, item.record


def resume_offset(path: str | os.PathLike[str]) -> int:
    """Repair ``path`` after a crash and return how many complete records it holds.

    A trailing line without its newline (or not valid JSON) was cut mid-write: it is removed.
    """
    p = Path(path)
    if not p.exists():
        return 0
    data = p.read_bytes()
    end = data.rfind(b"\n") + 1
    complete = data[:end]
    lines = [ln for ln in complete.split(b"\n") if ln.strip()]
    if lines:
        try:
            json.loads(lines[-1])
        except ValueError:  # a torn write that happened to end in a newline byte
            end = complete.rstrip(b"\n").rfind(b"\n") + 1
            lines.pop()
    if end != len(data):
        with open(p, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return len(lines)


def check_output(path: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False) -> None:
    """Fail early, before any model loads, when ``path`` cannot take a run's output (``-`` is standard output)."""
    if str(path) == "-":
        if resume:
            raise OutputPathError("--resume needs an output file: standard output cannot be read back")
        return
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(f"{p} is a directory: give a file name for the output")
    if p.exists():
        if not (resume or overwrite):
            raise OutputExistsError(f"{p} exists: pass --resume to continue it or --overwrite to start again")
        if not os.access(p, os.W_OK):
            raise OutputPathError(f"{p} is not writable")
        return
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot create {p}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot create {p}: the folder {parent} is not writable")


def open_resumable(path: str | os.PathLike[str], *, resume: bool, overwrite: bool) -> tuple[IO[str], int]:
    """Open a chunked run's JSONL output: ``(file, records already done)``.

    An existing file is refused unless ``resume`` (repaired by ``resume_offset``, then appended to)
    or ``overwrite`` (started again).
    """
    p = Path(path)
    if p.exists() and not (resume or overwrite):
        raise OutputExistsError(f"{p} exists: pass --resume to continue it or --overwrite to start again")
    done = resume_offset(p) if resume else 0
    p.parent.mkdir(parents=True, exist_ok=True)
    return open(p, "a" if resume else "w", encoding="utf-8"), done


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {size}")
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_durably(f: IO[str], records: Iterable[dict[str, Any]]) -> None:
    """Append records as JSON lines, then flush and fsync so a crash cannot lose them."""
    f.write("".join(json_line(r) for r in records))
    f.flush()
    fileno = getattr(f, "fileno", None)
    if fileno is not None and stat.S_ISREG(
        os.fstat(fileno()).st_mode
    ):  # a pipe or a terminal has no disk to sync
        os.fsync(fileno())


#: Characters that ``str.splitlines`` (and some JSON readers) take for line breaks; JSON may hold them raw.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_line(record: Any) -> str:
    """One JSONL line: UTF-8 as is, except characters any reader could split a line at (written escaped),
    and text that is not valid Unicode (a lone surrogate: the whole line is then ASCII-escaped)."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record) + "\n"
    return line.translate(_LINE_BREAKS) + "\n"
