"""The dequantized-GGUF cache: keyed by content (one copy per GGUF, whatever its path), written atomically,
shown and freed by ``aligner cache list|clear``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from aligner_core.cli.cache import register
from aligner_core.loading import cache as model_cache
from aligner_core.loading import gguf_copy_dir, resolve_source


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LLM_ALIGNER_CACHE", str(root))
    return root


def _gguf(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + payload)
    return path


def test_same_gguf_bytes_in_two_venvs_share_one_cache_entry(cache, tmp_path):
    first = _gguf(tmp_path / "venv-a" / "site-packages" / "m.Q4.gguf", b"weights" * 1000)
    second = tmp_path / "venv-b" / "site-packages" / "m.Q4.gguf"
    second.parent.mkdir(parents=True)
    shutil.copyfile(first, second)
    os.utime(second, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))  # a reinstall: new mtime
    renamed = tmp_path / "elsewhere" / "renamed.gguf"
    renamed.parent.mkdir()
    shutil.copyfile(first, renamed)
    other = _gguf(tmp_path / "venv-a" / "site-packages" / "other.gguf", b"different" * 1000)

    key = gguf_copy_dir(resolve_source(first))
    assert key.parent == cache / "gguf"
    assert gguf_copy_dir(resolve_source(second)) == key
    assert gguf_copy_dir(resolve_source(renamed)) == key
    assert gguf_copy_dir(resolve_source(other)) != key


def test_cache_key_changes_with_the_conversion_version(cache, tmp_path, monkeypatch):
    f = _gguf(tmp_path / "m.gguf", b"x" * 100)
    before = model_cache.entry_dir(f)
    monkeypatch.setattr(model_cache, "CONVERSION_VERSION", model_cache.CONVERSION_VERSION + 1)
    assert model_cache.entry_dir(f) != before


def test_content_hash_is_remembered_by_path_size_and_mtime(cache, tmp_path):
    f = _gguf(tmp_path / "m.gguf", b"a" * 5000)
    first = model_cache.content_hash(f)
    assert first == hashlib.sha256(f.read_bytes()).hexdigest()
    stat = f.stat()
    # Same size and mtime: the remembered hash is used, the file is not read again.
    f.write_bytes(b"GGUF" + b"b" * 5000)
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert model_cache.content_hash(f) == first
    # A new mtime means new content may be there: hash again.
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert model_cache.content_hash(f) == hashlib.sha256(f.read_bytes()).hexdigest() != first


def test_two_writers_at_once_leave_one_whole_entry(cache, tmp_path):
    a = _gguf(tmp_path / "a" / "m.gguf", b"same" * 100)
    b = tmp_path / "b" / "m.gguf"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    entry = model_cache.entry_dir(a)
    with model_cache.staged_entry(entry, a, name="first") as tmp_a:
        with model_cache.staged_entry(entry, b, name="second") as tmp_b:
            (tmp_b / "config.json").write_text('{"by": "b"}')
            assert not entry.exists()  # nothing is visible before the writer finishes
        (tmp_a / "config.json").write_text('{"by": "a"}')
    assert json.loads((entry / "config.json").read_text()) == {"by": "b"}  # the first to finish wins
    meta = json.loads((entry / model_cache.ENTRY_META).read_text())
    assert meta["name"] == "second" and meta["conversion"] == model_cache.conversion_tag()
    assert set(meta["sources"]) == {str(a.resolve()), str(b.resolve())}
    leftovers = [p.name for p in entry.parent.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []

    failed = model_cache.entry_dir(_gguf(tmp_path / "c.gguf", b"c"))
    with (
        pytest.raises(RuntimeError, match="disk full"),
        model_cache.staged_entry(failed, tmp_path / "c.gguf", name="c"),
    ):
        raise RuntimeError("disk full")
    assert not failed.exists() and not any(p.name.startswith(".tmp-") for p in failed.parent.iterdir())


def _fill_cache(cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    kept = _gguf(tmp_path / "venv" / "m.gguf", b"k" * 300)
    gone = _gguf(tmp_path / "old-venv" / "m2.gguf", b"g" * 300)
    for src, name in ((kept, "HuggingFaceTB/SmolLM2-135M-Instruct"), (gone, "my-model")):
        with model_cache.staged_entry(model_cache.entry_dir(src), src, name=name) as tmp:
            (tmp / "config.json").write_text("{}")
            (tmp / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    gone.unlink()
    legacy = cache / "gguf" / "SmolLM2-135M-Instruct.Q4_1-0165f4a1a97ad3fc"
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes(b"\0" * 1_000_000)
    (legacy / "gguf_origin.json").write_text(
        json.dumps({"gguf": "/old/venv/SmolLM2.gguf", "name": "SmolLM2"})
    )
    (cache / "gguf" / ".tmp-abandoned").mkdir()
    (cache / "gguf" / "not-ours").mkdir()  # something this library did not write: never touched
    return kept, gone


def test_cache_list_and_clear_commands(cache, tmp_path):
    kept, gone = _fill_cache(cache, tmp_path)
    app = typer.Typer()
    register(app)
    runner = CliRunner()

    listed = runner.invoke(app, ["cache", "list"])
    assert listed.exit_code == 0, listed.output
    out = listed.output
    assert str(cache / "gguf") in out
    assert "HuggingFaceTB/SmolLM2-135M-Instruct  2.0 MB  just now" in out
    assert f"from {kept.resolve()}\n" in out and f"from {gone.resolve()}  (gone)" in out
    assert "unused: path-keyed copy" in out and "/old/venv/SmolLM2.gguf" in out and "interrupted" in out
    assert "total: 5.0 MB in 4 entries" in out
    assert "not-ours" not in out

    refused = runner.invoke(app, ["cache", "clear"], input="n\n")
    assert refused.exit_code == 1 and "delete 4 cached model(s), 5.0 MB" in refused.output
    assert len(model_cache.list_entries()) == 4

    cleared = runner.invoke(app, ["cache", "clear", "--yes"])
    assert cleared.exit_code == 0 and "deleted 4 cached model(s), freed 5.0 MB" in cleared.output
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == ["not-ours"]
    assert "the model cache is empty" in runner.invoke(app, ["cache", "list"]).output
