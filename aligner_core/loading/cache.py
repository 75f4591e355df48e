"""The cache of dequantized GGUF models: one copy per GGUF *content*, written atomically, listable.

Keying by content (not by the file's path) means a reinstall or a second virtualenv holding the same GGUF
reuses the copy instead of writing another ~500 MB. Hashing ~100 MB takes a moment, so each file's hash is
remembered by ``(path, size, mtime_ns)`` and later loads only ``stat`` the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Bump when the dequantized output changes (other dtype, other files): older entries are then ignored.
CONVERSION_VERSION = 1

#: Metadata file of an entry written by this version.
ENTRY_META = "aligner_cache.json"
#: Metadata file of the path-keyed entries of earlier versions (listed and cleared, never read for loading).
LEGACY_META = "gguf_origin.json"
_INDEX = "hash-index.json"
_TMP_PREFIX = ".tmp-"


def cache_root() -> Path:
    """Where llm-aligner caches models (``LLM_ALIGNER_CACHE`` overrides, else ``$XDG_CACHE_HOME/llm-aligner``)."""
    env = os.environ.get("LLM_ALIGNER_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llm-aligner"


def gguf_cache_dir() -> Path:
    """The folder holding one subfolder per dequantized GGUF."""
    return cache_root() / "gguf"


def _write_json_atomic(path: Path, data: Any) -> None:
    """Readers see the old file or the new one, never half of one (several processes may write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def content_hash(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file, remembered by ``(path, size, mtime_ns)`` so that later calls only stat it."""
    f = Path(path).resolve()
    stat = f.stat()
    index_file = gguf_cache_dir() / _INDEX
    index = _read_json(index_file)
    known = index.get(str(f))
    if (
        isinstance(known, dict)
        and known.get("size") == stat.st_size
        and known.get("mtime_ns") == stat.st_mtime_ns
    ):
        return str(known["sha256"])
    digest = hashlib.sha256()
    with f.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    sha = digest.hexdigest()
    index = _read_json(index_file)  # re-read: another process may have added entries meanwhile
    index[str(f)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    with contextlib.suppress(OSError):  # a read-only cache still works, it just hashes again next time
        _write_json_atomic(index_file, index)
    return sha


def conversion_tag() -> str:
    """What, besides the GGUF's bytes, decides the converted files: our conversion and transformers' major
    version (configs saved by one major version may not load in an older one)."""
    try:
        major = importlib.metadata.version("transformers").split(".")[0]
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - transformers is a dependency
        major = "0"
    return f"c{CONVERSION_VERSION}-tf{major}"


def entry_dir(gguf: str | os.PathLike[str]) -> Path:
    """The cache folder of ``gguf``'s dequantized copy; the same for every copy of the same file."""
    key = f"{content_hash(gguf)}|{conversion_tag()}"
    return gguf_cache_dir() / hashlib.sha256(key.encode()).hexdigest()[:24]


def is_complete(entry: Path) -> bool:
    """Entries appear by an atomic rename, so one that exists with its metadata is whole."""
    return (entry / ENTRY_META).is_file() and (entry / "config.json").is_file()


def note_source(entry: Path, gguf: str | os.PathLike[str]) -> None:
    """Record that ``gguf`` (one more path with the same bytes) uses ``entry``, for ``aligner cache list``."""
    meta_file = entry / ENTRY_META
    meta = _read_json(meta_file)
    path = str(Path(gguf).resolve())
    sources = meta.setdefault("sources", [])
    if path in sources:
        return
    sources.append(path)
    with contextlib.suppress(OSError):
        _write_json_atomic(meta_file, meta)


@contextlib.contextmanager
def staged_entry(entry: Path, gguf: str | os.PathLike[str], *, name: str) -> Iterator[Path]:
    """Yield an empty folder to save the converted model in; on success it becomes ``entry`` in one rename.

    Two processes converting the same file at once each write their own folder; the first rename wins
    and the other copy is dropped, so a reader never sees a half-written entry.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=entry.parent))
    try:
        yield tmp
        meta = {
            "name": name,
            "sha256": content_hash(gguf),
            "conversion": conversion_tag(),
            "created": time.time(),
            "sources": [str(Path(gguf).resolve())],
        }
        _write_json_atomic(tmp / ENTRY_META, meta)
        try:
            tmp.rename(entry)
        except OSError:  # another process won the race; its copy is as good as ours
            if not is_complete(entry):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            note_source(entry, gguf)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass(frozen=True)
class CacheEntry:
    """One folder of the cache, as ``aligner cache list`` shows it."""

    path: Path
    name: str
    size: int
    created: float
    sources: list[str] = field(default_factory=list)
    #: ``"current"``, ``"legacy"`` (path-keyed, from an earlier version: never used again) or ``"partial"``
    #: (an interrupted conversion).
    state: str = "current"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def list_entries() -> list[CacheEntry]:
    """Every entry this library wrote under the cache (current, legacy and interrupted ones), oldest first."""
    root = gguf_cache_dir()
    if not root.is_dir():
        return []
    entries = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.is_symlink():
            continue
        if d.name.startswith(_TMP_PREFIX):
            entries.append(
                CacheEntry(d, "(interrupted conversion)", _size(d), d.stat().st_mtime, state="partial")
            )
        elif (d / ENTRY_META).is_file():
            meta = _read_json(d / ENTRY_META)
            entries.append(
                CacheEntry(
                    d,
                    str(meta.get("name") or d.name),
                    _size(d),
                    float(meta.get("created") or d.stat().st_mtime),
                    [str(s) for s in meta.get("sources", [])],
                )
            )
        elif (d / LEGACY_META).is_file():
            meta = _read_json(d / LEGACY_META)
            sources = [str(meta["gguf"])] if meta.get("gguf") else []
            entries.append(
                CacheEntry(
                    d, str(meta.get("name") or d.name), _size(d), d.stat().st_mtime, sources, state="legacy"
                )
            )
    return sorted(entries, key=lambda e: e.created)


def clear() -> tuple[int, int]:
    """Delete every entry :func:`list_entries` shows (and the hash index); return ``(entries, bytes)`` freed.

    Only folders this library wrote are removed, so a ``LLM_ALIGNER_CACHE`` pointed at a shared folder
    loses nothing else.
    """
    count = freed = 0
    for entry in list_entries():
        shutil.rmtree(entry.path, ignore_errors=True)
        if not entry.path.exists():
            count += 1
            freed += entry.size
    with contextlib.suppress(FileNotFoundError):
        (gguf_cache_dir() / _INDEX).unlink()
    return count, freed


__all__ = [
    "CONVERSION_VERSION",
    "CacheEntry",
    "cache_root",
    "clear",
    "content_hash",
    "conversion_tag",
    "entry_dir",
    "gguf_cache_dir",
    "is_complete",
    "list_entries",
    "note_source",
    "staged_entry",
]
