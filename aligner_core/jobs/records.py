"""One loader for every command's input records: JSONL (a file or ``-`` for stdin), JSON, CSV/TSV, Parquet,
a ``datasets`` folder (``save_to_disk``) or a ``datasets`` name.

JSONL is streamed line by line, so a pipe is read once and a huge file never sits in memory; the other
formats go through the ``datasets`` library (CSV/TSV and JSON arrays are small enough for the standard
library when ``datasets`` is not installed). Each record comes with its number and a label that says
where it is (``line 7``, ``row 3``, ``record 2``), so errors name the input's own coordinates.
"""

from __future__ import annotations

import csv
import json
import os
import stat
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import AlignerError, missing

#: The name that means standard input (and, for outputs, standard output).
STDIO = "-"
#: File types read by suffix; anything else must be a directory or a ``datasets`` name.
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


class RecordSourceError(AlignerError, ValueError):
    """The input cannot be read as records (missing, unsupported type, unreadable dataset)."""


@dataclass(frozen=True)
class Item:
    """One input record: its 1-based number, where it is (``line 7``), and the record or why it is unreadable."""

    number: int
    where: str
    record: dict[str, Any] | Exception

    @property
    def line(self) -> int:
        """The file line of a JSON-lines record (blank lines counted), else the record number."""
        kind, _, value = self.where.partition(" ")
        return int(value) if kind == "line" and value.isdigit() else self.number


def is_stdio(source: Any) -> bool:
    return isinstance(source, str) and source == STDIO


def check_input(source: str | os.PathLike[str]) -> None:
    """Fail early, before any model loads, when ``source`` cannot be read as records."""
    if is_stdio(source):
        return
    path = Path(source).expanduser()
    if path.is_dir():
        return
    if path.exists():
        if path.suffix.lower() not in SUFFIXES and not _is_stream(path):
            raise RecordSourceError(
                f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet "
                "(or - for JSON lines on standard input)"
            )
        if not os.access(path, os.R_OK):
            raise RecordSourceError(f"{path} is not readable")
        return
    if (
        str(source).startswith((".", "/", "~"))
        or str(source).count("/") > 1
        or path.suffix.lower() in SUFFIXES
    ):
        raise RecordSourceError(f"no such file or directory: {source}")


def iter_items(
    source: str | os.PathLike[str], *, skip: int = 0, split: str = "train", config_name: str | None = None
) -> Iterator[Item]:
    """Yield every record of ``source`` after the first ``skip``; unreadable ones as an exception in place."""
    check_input(source)
    items = _items(source, split=split, config_name=config_name)
    for item in items:
        if item.number > skip:
            yield item


def numbered(
    source: str | os.PathLike[str], *, skip: int = 0
) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    """``(line, record or why it is unreadable)``: what the chunked jobs consume (``Item.line``)."""
    return ((item.line, item.record) for item in iter_items(source, skip=skip))


def count_items(source: str | os.PathLike[str]) -> int | None:
    """How many records ``source`` holds, or None when counting would consume it (a pipe, standard input)."""
    if is_stdio(source):
        return None
    path = Path(source).expanduser()
    if not path.is_file() or _is_stream(path):
        return None
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    return sum(1 for _ in _items(source))


def _is_stream(path: Path) -> bool:
    """A pipe, a FIFO or a character device (``/dev/stdin``, process substitution): readable once only."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)


def _items(
    source: str | os.PathLike[str], *, split: str = "train", config_name: str | None = None
) -> Iterator[Item]:
    if is_stdio(source):
        yield from json_lines(sys.stdin)
        return
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.exists() and not path.is_dir() and (suffix == ".jsonl" or _is_stream(path)):
        with open(path, encoding="utf-8") as f:
            yield from json_lines(f)
    elif path.is_file() and suffix == ".json":
        yield from _json_file(path)
    elif path.is_file() and suffix in {".csv", ".tsv"}:
        yield from _csv_file(path, delimiter="\t" if suffix == ".tsv" else ",")
    elif path.is_file() and suffix == ".parquet":
        yield from _rows(_load_dataset("parquet", data_files=str(path), split="train"))
    elif path.is_dir():
        yield from _rows(_dataset_dir(path, split))
    else:
        yield from _rows(_load_dataset(str(source), config_name, split=split))


def json_lines(f: IO[str] | Iterable[str]) -> Iterator[Item]:
    """JSON lines, one record per non-blank line; a bad line is reported with its line and column."""
    number = 0
    for line_no, line in enumerate(f, start=1):
        if not line.strip():
            continue
        number += 1
        where = f"line {line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Item(number, where, ValueError(f"{where}, column {exc.colno}: invalid JSON ({exc.msg})"))
            continue
        if not isinstance(record, dict):
            yield Item(
                number, where, ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            )
            continue
        yield Item(number, where, record)


def _json_file(path: Path) -> Iterator[Item]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines saved with a .json name
            yield from json_lines(text.splitlines(keepends=True))
            return
        raise RecordSourceError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})"
        ) from None
    if isinstance(data, Mapping):  # {"train": [...]} or {"data": [...]}: one list of records inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise RecordSourceError(
                f"{path}: expected a JSON array of records (or an object holding exactly one)"
            )
        data = lists[0]
    if not isinstance(data, list):
        raise RecordSourceError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for i, item in enumerate(data, start=1):
        where = f"record {i}"
        record = (
            item
            if isinstance(item, dict)
            else ValueError(f"{where}: expected an object, got {type(item).__name__}")
        )
        yield Item(i, where, record)


def _csv_file(path: Path, *, delimiter: str) -> Iterator[Item]:
    """CSV/TSV with a header row; streamed with the standard library (values are strings, as in the file)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for i, row in enumerate(reader, start=1):
            where = f"row {i} (line {reader.line_num})"
            if None in row:
                yield Item(i, where, ValueError(f"{where}: more values than the header has columns"))
                continue
            yield Item(i, where, {k: v for k, v in row.items() if k is not None})


def _rows(dataset: Any) -> Iterator[Item]:
    for i, row in enumerate(dataset, start=1):
        yield Item(i, f"row {i}", dict(row))


def _load_dataset(*args: Any, **kwargs: Any) -> Any:
    try:
        import datasets
    except ImportError:
        raise missing("datasets", "train", feature="reading Parquet files and `datasets` names") from None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in {"0", "", "false", "False"}
        hint = " (HF_HUB_OFFLINE is set: only cached datasets load)" if offline else ""
        raise RecordSourceError(f"could not load dataset {args[0]!r}{hint}: {exc}") from exc


def _dataset_dir(path: Path, split: str) -> Any:
    """A directory written by ``save_to_disk`` (a Dataset or a DatasetDict), else a folder of data files."""
    if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        return _load_dataset(str(path), split=split)
    try:
        import datasets
    except ImportError:
        raise missing("datasets", "train", feature="reading a dataset directory") from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise RecordSourceError(
                f"{path} has no split {split!r}; it has {', '.join(loaded)} (pick one with --split)"
            )
        return loaded[split]
    return loaded


__all__ = [
    "STDIO",
    "Item",
    "RecordSourceError",
    "check_input",
    "count_items",
    "is_stdio",
    "iter_items",
    "json_lines",
    "numbered",
]
