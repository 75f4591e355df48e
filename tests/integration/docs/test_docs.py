"""Every Python example in README.md and docs/*.md runs (blocks of one page share a namespace), and the
shell examples of the docs pages run too, in a scratch directory."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(python|bash)\n(.*?)```", re.S)


def blocks(page: Path, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(page.read_text()) if kind == lang]


def server_env(page: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    """Pages whose examples talk to a server get the session's real vLLM server in ``$ALIGNER_SERVER``;
    pages that start Ray get a temp folder of their own for it (removed afterwards)."""
    env: dict[str, str] = {}
    text = page.read_text()
    if "ALIGNER_SERVER" in text:
        env["ALIGNER_SERVER"] = request.getfixturevalue("vllm_server").url  # skips without vLLM
    if "--ray" in text or "ray.init" in text:
        ray_tmp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must stay under 107 bytes
        request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
        env["RAY_TMPDIR"] = ray_tmp
    return env


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python")], ids=lambda p: p.name)
def test_python_examples_run(page, smollm2, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    for key, value in server_env(page, request).items():
        monkeypatch.setenv(key, value)
    namespace: dict = {"__name__": "__docs__"}
    for code in blocks(page, "python"):
        exec(compile(code, f"{page.name}", "exec"), namespace)


@pytest.mark.parametrize(
    "page", [p for p in PAGES if p.name != "README.md" and blocks(p, "bash")], ids=lambda p: p.name
)
def test_shell_examples_run(page, smollm2, tmp_path, request):
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bindir + os.pathsep + os.environ["PATH"],
        "HF_HUB_OFFLINE": "1",
        **server_env(page, request),
    }
    script = "set -euo pipefail\n" + "\n".join(blocks(page, "bash"))
    run = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
