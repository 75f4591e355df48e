"""Start and stop real vLLM (CPU) OpenAI-compatible servers for tests and benchmarks.

vLLM runs from its own virtualenv (``scripts/setup_vllm.sh`` makes ``.venv-vllm``) on a plain
safetensors copy of the packaged SmolLM2 (``model_dir()``), in float32 by default
(``$ALIGNER_VLLM_DTYPE``): vLLM's batches are not batch-invariant, and in bfloat16 the greedy text of
one request changed with what shared its batch; float32 keeps the argmax stable. Each server gets its own temp/cache
folder, which ``stop`` removes; servers are stopped by their PID (and their process group, so the
engine-core child goes too).

Command line (used by ``scripts/test.sh``)::

    python -m tests.servers.vllm_server model-dir            # prints the prepared model directory
    python -m tests.servers.vllm_server serve --port 8011    # runs a server in the foreground (exec)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVED_NAME = "smollm2"
NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}


def vllm_python() -> Path | None:
    """The python of the vLLM virtualenv, when it exists (``$ALIGNER_VLLM_PYTHON`` overrides)."""
    path = Path(os.environ.get("ALIGNER_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")
    return path if path.exists() else None


def model_dir() -> Path:
    """The packaged SmolLM2 as a safetensors directory vLLM accepts (made once, cached)."""
    from aligner_core.loading import DEFAULT_MODEL, cache_root, load_model

    target = cache_root() / "vllm" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    _model, _tok, source = load_model(DEFAULT_MODEL)  # dequantizes the GGUF once into the cache
    del _model
    from aligner_core.loading import gguf_copy_dir  # the cached safetensors copy

    cached = gguf_copy_dir(source)
    sys.path.insert(0, str(ROOT / "scripts"))
    from vllm_model import prepare  # type: ignore[import-not-found]

    return prepare(cached, target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(
    model: Path, port: int, *, speculative: bool = False, python: Path | None = None
) -> list[str]:
    py = python or vllm_python()
    if py is None:
        raise RuntimeError("no .venv-vllm: run bash scripts/setup_vllm.sh")
    cmd = [
        str(py),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        os.environ.get("ALIGNER_VLLM_DTYPE", "float32"),
        "--max-model-len",
        "2048",
        "--enforce-eager",
        # real tool calls for the agent tests: SmolLM2 writes hermes-style <tool_call> blocks
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
    ]
    if speculative:
        cmd += ["--speculative-config", json.dumps(NGRAM)]
    return cmd


def server_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    for sub in ("tmp", "cache"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    env.update(
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "2"),
        VLLM_CACHE_ROOT=str(workdir / "cache"),
        TMPDIR=str(workdir / "tmp"),
        HF_HUB_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_RPC_BASE_PATH=str(workdir / "tmp"),
    )
    return env


SHM = Path("/dev/shm")


def shm_entries() -> set[str]:
    return set(os.listdir(SHM)) if SHM.is_dir() else set()


def _mapped_paths() -> set[str]:
    """Every file some live process maps (so a segment still in use is never removed)."""
    paths: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            paths.update(
                line.split(maxsplit=5)[-1].strip()
                for line in maps.read_text().splitlines()
                if "/dev/shm/" in line
            )
    return paths


def remove_orphaned_shm(before: set[str]) -> None:
    """Remove the shared-memory segments that appeared since ``before`` and nothing maps any more
    (a SIGKILLed vLLM leaves its ``psm_*`` and ``sem.mp-*`` entries behind)."""
    mapped = _mapped_paths()
    for name in shm_entries() - before:
        if str(SHM / name) not in mapped:
            with contextlib.suppress(OSError):
                (SHM / name).unlink()


@dataclass
class VLLMServer:
    """A running vLLM server started by this process."""

    proc: subprocess.Popen
    port: int
    workdir: Path
    log: Path
    model: str = SERVED_NAME
    stopped: bool = field(default=False)
    shm_before: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_healthy(self, timeout: float = 300.0) -> VLLMServer:
        wait_healthy(f"http://127.0.0.1:{self.port}", timeout, proc=self.proc, log=self.log)
        return self

    def kill(self) -> None:
        """Die the hard way (SIGKILL to the whole group), as a crashed server would."""
        _signal_group(self.proc, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        stop_process(self.proc)
        shutil.rmtree(self.workdir, ignore_errors=True)
        remove_orphaned_shm(self.shm_before)


@dataclass
class ExternalServer:
    """A server someone else started (``scripts/test.sh``) and will stop."""

    url: str
    model: str = SERVED_NAME


def start(model: Path | None = None, *, port: int | None = None, speculative: bool = False) -> VLLMServer:
    """Start a server in its own process group; call ``wait_healthy()`` then ``stop()``."""
    model = model or model_dir()
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="aligner-vllm-"))
    log = workdir / "server.log"
    before = shm_entries()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            server_command(model, port, speculative=speculative),
            env=server_env(workdir),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return VLLMServer(proc, port, workdir, log, shm_before=before)


def wait_healthy(
    root_url: str, timeout: float, *, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(
                f"the vLLM server exited with {proc.returncode} before it was healthy:\n{tail}"
            )
        try:
            with urllib.request.urlopen(f"{root_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the vLLM server at {root_url} was not healthy after {timeout:.0f}s")


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # the server was started in a session of its own: pgid == pid


def stop_process(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM by PID, then the group; SIGKILL whatever is left after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    _signal_group(proc, signal.SIGTERM)
    time.sleep(0.5)
    _signal_group(proc, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("model-dir", help="prepare and print the model directory vLLM serves")
    serve = sub.add_parser("serve", help="run a server in the foreground (replaces this process)")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--workdir", type=Path, required=True)
    serve.add_argument("--speculative", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "model-dir":
        print(model_dir())
        return 0
    cmd = server_command(model_dir(), args.port, speculative=args.speculative)
    os.execve(cmd[0], cmd, server_env(args.workdir))
    return 0  # pragma: no cover


if __name__ == "__main__":
    raise SystemExit(main())
