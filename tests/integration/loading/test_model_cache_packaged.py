"""The dequantized-GGUF cache with the real packaged SmolLM2: two installs of one GGUF share one copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from aligner_core.loading import cache as model_cache


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LLM_ALIGNER_CACHE", str(root))
    return root


def test_packaged_gguf_copies_share_one_dequantized_copy(cache, tmp_path):
    """Two installs of the same GGUF (two venvs) convert it once; ``clear`` frees it."""
    from aligner_core.loading import DEFAULT_MODEL, load_model, packaged_model_path
    from tests.conftest import require_packaged_model

    require_packaged_model()
    packaged = packaged_model_path(DEFAULT_MODEL)
    copies = []
    for venv in ("venv-a", "venv-b"):
        (tmp_path / venv).mkdir()
        copies.append(Path(shutil.copy2(packaged, tmp_path / venv / packaged.name)))
    _model, tokenizer, _source = load_model(copies[0], device="cpu")
    conversions: list[str] = []
    real = model_cache.staged_entry

    def staged(*args: object, **kwargs: object) -> object:
        conversions.append(str(args[1]))
        return real(*args, **kwargs)

    model_cache.staged_entry = staged  # type: ignore[assignment]
    try:
        _model2, _tok2, _source2 = load_model(copies[1], device="cpu")
    finally:
        model_cache.staged_entry = real  # type: ignore[assignment]
    assert conversions == []  # the second install found the first one's copy: no second conversion
    entries = model_cache.list_entries()
    assert len(entries) == 1 and entries[0].state == "current"
    assert set(entries[0].sources) == {str(c.resolve()) for c in copies}
    assert entries[0].size > 100_000_000
    assert model_cache.clear() == (1, entries[0].size)
