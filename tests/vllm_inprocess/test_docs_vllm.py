"""The ``python vllm`` examples of docs/engines.md run, as a script would run them (``__name__ == "__main__"``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm_inprocess, pytest.mark.integration]

PAGE = Path(__file__).resolve().parents[2] / "docs" / "engines.md"


def test_vllm_examples_of_the_engines_page_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python vllm\n(.*?)```", PAGE.read_text(), re.S)
    assert blocks, "docs/engines.md lost its vLLM example"
    monkeypatch.chdir(tmp_path)
    for name, value in {
        "TMPDIR": tmp_path,
        "VLLM_CACHE_ROOT": tmp_path / "cache",
        "VLLM_RPC_BASE_PATH": tmp_path,
    }.items():
        monkeypatch.setenv(name, str(value))  # vLLM's sockets and caches stay in this test's folder
    for code in blocks:
        exec(compile(code, PAGE.name, "exec"), {"__name__": "__main__"})
