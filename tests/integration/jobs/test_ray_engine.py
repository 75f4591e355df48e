"""The Ray engine on a real local Ray cluster: Ray Data replicas, the ``--ray`` CLI killed and resumed.

Ray leaves things behind (ENGINES.md): worker processes that outlive ``ray.shutdown()`` by seconds, and
with vLLM inside, a ``/dev/shm/psm_*`` segment per run. Every process a test starts is stopped by its PID
or its session, and any segment those processes mapped and nobody maps any more is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from aligner_core import Aligner, GenerationOptionError  # noqa: E402
from aligner_core.errors import EngineUnavailableError  # noqa: E402
from aligner_core.jobs.choice import EngineChoice  # noqa: E402
from aligner_core.jobs.files import correct_jsonl  # noqa: E402
from aligner_core.jobs.ray import correct_dataset, correct_file_ray  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")]

N = 64
LOAD = {"max_new_tokens": 8}
SHM = Path("/dev/shm")


def make_pairs(n: int = N) -> list[tuple[str, str]]:
    return [
        (f"Question {i}: how many legs does a spider have?", f"Answer {i}: spiders have {i % 9} legs.")
        for i in range(n)
    ]


def write_input(path: Path, n: int = N) -> Path:
    path.write_text(
        "".join(
            json.dumps({"id": i, "question": q, "answer": a}) + "\n" for i, (q, a) in enumerate(make_pairs(n))
        )
    )
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc, so nothing to install)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def in_session(sid: int) -> set[int]:
    """Live processes of session ``sid`` (a process started with ``start_new_session`` and its offspring)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[4]) == sid:
                    found.add(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def alive(pids: set[int]) -> set[int]:
    """The processes of ``pids`` that still run (zombies count as gone)."""
    live = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            live.add(pid)
    return live


def stop(pids: set[int], grace: float) -> None:
    """Wait up to ``grace`` seconds for ``pids`` to exit, then SIGKILL the rest, and wait for them."""
    deadline = time.time() + grace
    while alive(pids) and time.time() < deadline:
        time.sleep(0.2)
    for pid in alive(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while alive(pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(pids), f"Ray processes outlived the test: {sorted(alive(pids))}"


def segments_of(pids: set[int]) -> set[str]:
    """The ``/dev/shm/psm_*`` segments that ``pids`` map (what Ray runs that host vLLM leak, ENGINES.md)."""
    found = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        found |= {line.rsplit("/", 1)[1].split()[0] for line in maps.splitlines() if "/dev/shm/psm_" in line}
    return found


def remove_leaked(segments: set[str]) -> None:
    """Unlink the segments of ours that no live process maps any more; another job's are never touched."""
    live = segments_of({int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()})
    for name in segments - live:
        (SHM / name).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def ray_tmpdir():
    """Ray's session folders (logs, sockets) in a short folder of this module's, removed at the end."""
    path = Path(
        tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    )  # short: Ray's socket paths must stay < 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster(ray_tmpdir):
    """One local Ray runtime for the in-process tests; its processes and segments are gone afterwards."""
    if ray.is_initialized():
        pytest.skip("a Ray runtime is already initialised in this process")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", str(ray_tmpdir))
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ours = descendants(os.getpid())
        segments = segments_of(ours)
        ray.shutdown()
        stop(ours, grace=1)
        remove_leaked(segments)


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> list[str]:
    """What one local Aligner says for every pair: greedy, so every replica must say the same."""
    with Aligner.from_pretrained(tiny_model_dir, **LOAD) as aligner:
        return [c.text for c in aligner.correct_batch(make_pairs())]


@pytest.fixture
def preserve_order():
    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    yield
    context.execution_options.preserve_order = saved


def test_cli_killed_mid_run_then_resumed(tiny_model_dir, tmp_path, reference, ray_tmpdir):
    """SIGKILL ``aligner correct --ray`` (and the Ray runtime it started) once some batches are written;
    ``--resume`` then finishes the file with nothing lost or written twice."""
    inp, out = write_input(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    args = [
        sys.executable,
        "-m",
        "aligner_core",
        "correct",
        str(inp),
        "-o",
        str(out),
        "--ray",
        "--replicas",
        "2",
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "8",
        "--chunk-size",
        "2",
        "--no-progress",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(ray_tmpdir)}
    env.pop("RAY_ADDRESS", None)  # its own local runtime, which it shuts down
    log = tmp_path / "stderr.log"
    segments: set[str] = set()
    runs: list[subprocess.Popen] = []
    try:
        with open(log, "wb") as err:
            runs.append(
                subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            )
        first = runs[0]
        deadline = time.time() + 180
        while time.time() < deadline and first.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.01)
        session = in_session(first.pid)
        segments |= segments_of(session)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        stop(session, grace=0)  # Ray processes that left the process group but not the session
        partial = out.read_bytes().count(b"\n") if out.exists() else 0
        assert 2 <= partial < N, f"the run was not killed mid-way ({partial} lines): {log.read_text()}"

        with open(log, "wb") as err:
            runs.append(
                subprocess.Popen(
                    [*args, "--resume"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,
                )
            )
        assert runs[1].wait(timeout=300) == 0, log.read_text()
        assert f"{partial} already done" in log.read_text()
    finally:
        for run in runs:
            if run.poll() is None:
                segments |= segments_of(in_session(run.pid))
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
            stop(in_session(run.pid), grace=1)
        remove_leaked(segments)
    rows = read(out)
    assert [r["id"] for r in rows] == list(range(N))
    assert [r["correction"] for r in rows] == reference
    assert all(r["aligner"]["completion_tokens"] <= 8 for r in rows)


def test_correct_dataset_with_two_replicas(ray_cluster, preserve_order, tiny_model_dir, reference):
    items = [{"id": i, "question": q, "answer": a} for i, (q, a) in enumerate(make_pairs())]
    ds = correct_dataset(
        ray.data.from_items(items),
        EngineChoice(model=str(tiny_model_dir)),
        load_options=LOAD,
        replicas=2,
        batch_size=8,
    )
    rows = ds.take_all()
    assert [r["id"] for r in rows] == list(range(N))
    assert [(r["question"], r["answer"]) for r in rows] == [(i["question"], i["answer"]) for i in items]
    assert [r["correction"] for r in rows] == reference
    assert all(r["aligner_error"] is None for r in rows)
    stats = [json.loads(r["aligner"]) for r in rows]
    assert all(
        0 < s["completion_tokens"] <= 8 and s["metadata"]["template"] == "aligner-general" for s in stats
    )


def test_file_with_bad_lines_matches_the_local_file_job(ray_cluster, tiny_model_dir, tmp_path):
    """A malformed line, a non-object, a missing field, a non-string and an empty answer each get an
    ``aligner_error`` row in place; every line equals what ``correct_jsonl`` writes (latency aside)."""
    inp = tmp_path / "in.jsonl"
    extra = {
        1: {
            "context": [
                {"type": "tool_result", "name": "count", "content": "8 legs"},
                "A spider is an arachnid.",
            ]
        },
        4: {
            "chat_history": [{"role": "user", "content": "I study spiders."}],
            "context": "Spiders have 8 legs.",
        },
    }
    good = [
        json.dumps({"id": i, "question": q, "answer": a, **extra.get(i, {})})
        for i, (q, a) in enumerate(make_pairs(6))
    ]
    bad = [
        '{"id": 100, "question": "cut',
        "[1, 2]",
        json.dumps({"id": 101, "question": "q"}),
        json.dumps({"id": 102, "question": "q", "answer": 7}),
        json.dumps({"id": 103, "question": "q", "answer": " "}),
    ]
    inp.write_text("\n".join(good[:2] + bad[:2] + good[2:4] + ["", *bad[2:]] + good[4:] + [bad[0]]) + "\n")
    out = tmp_path / "out.jsonl"
    stats = correct_file_ray(
        inp,
        out,
        EngineChoice(model=str(tiny_model_dir)),
        load_options=LOAD,
        chunk_size=2,
        show_progress=False,
    )
    assert (stats.skipped, stats.written, stats.failed) == (0, 12, 6)
    got = read(out)
    assert [r.get("id", r.get("line")) for r in got] == [0, 1, 3, 4, 2, 3, 101, 102, 103, 4, 5, 13]
    assert got[2] == {
        "line": 3,
        "correction": None,
        "aligner_error": {"type": "ValueError", "message": got[2]["aligner_error"]["message"]},
    }
    assert "invalid JSON" in got[2]["aligner_error"]["message"]
    assert [r["aligner_error"]["type"] for r in got if r["correction"] is None] == [
        "ValueError",
        "ValueError",
        "InvalidInputError",
        "InvalidInputError",
        "EmptyAnswerError",
        "ValueError",
    ]
    with Aligner.from_pretrained(tiny_model_dir, **LOAD) as aligner:
        correct_jsonl(aligner, inp, tmp_path / "local.jsonl", chunk_size=64, show_progress=False)
    want = read(tmp_path / "local.jsonl")
    grounded = {
        r["id"]: r["aligner"]["metadata"] for r in got if r.get("id") in (1, 4)
    }  # history and context ride along
    assert grounded[1]["context_items"] == 2 and (
        grounded[4]["context_items"],
        grounded[4]["history_turns"],
    ) == (1, 1)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("aligner", "aligner_error")}  # noqa: E731
    assert [strip(r) for r in got] == [strip(r) for r in want]
    for g, w in zip(got, want):
        assert {**g.get("aligner", {}), "latency_s": 0} == {**w.get("aligner", {}), "latency_s": 0}
        assert ("aligner_error" in g) == ("aligner_error" in w)
        assert g.get("aligner_error", {}).get("type") == w.get("aligner_error", {}).get("type")


def test_options_are_checked_before_any_replica_starts(ray_cluster, tiny_model_dir):
    ds = ray.data.from_items([{"question": "q", "answer": "a"}])
    with pytest.raises(GenerationOptionError, match="temperature"):
        correct_dataset(ds, EngineChoice(model=str(tiny_model_dir)), temperature="hot")
    with pytest.raises(ValueError, match="replicas must be a positive integer, got 0"):
        correct_dataset(ds, EngineChoice(model=str(tiny_model_dir)), replicas=0)


def test_engine_outage_stops_the_job_for_resume(ray_cluster, tmp_path):
    """A server that is down: the lines before the first record are written, then the job stops with
    ``EngineUnavailableError`` instead of marking the rows failed, so ``--resume`` can retry them."""
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        "\n".join(
            [
                "{oops",
                json.dumps({"id": 1, "question": "q"}),
                *(
                    json.dumps({"id": i, "question": q, "answer": a})
                    for i, (q, a) in enumerate(make_pairs(4), start=2)
                ),
            ]
        )
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    dead = EngineChoice(server="http://127.0.0.1:9/v1", model="m", max_retries=0, timeout=2)
    with pytest.raises(EngineUnavailableError, match="ServerUnavailableError"):
        correct_file_ray(inp, out, dead, load_options={"template": "aligner-v1", **LOAD}, show_progress=False)
    assert [r.get("id", r.get("line")) for r in read(out)] == [1, 1]
    assert all(r["correction"] is None for r in read(out))
