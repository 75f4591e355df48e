"""The llama.cpp engine (``engine="llama.cpp"``): every entry point on the packaged SmolLM2 GGUF.

Skips when llama-cpp-python is not installed (``pip install "llm-aligner[llamacpp]"``: it compiles llama.cpp for
about six minutes). The drafting arithmetic is tested without a model in tests/unit/engines/test_llamacpp_engine.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[3] / "benchmarks" / "data" / "copyedit8.jsonl"
PAIRS = [(r["question"], r["answer"]) for r in map(json.loads, DATA.read_text().splitlines()) if r]
QUESTION, ANSWER = PAIRS[0]


# -- the engine on the packaged GGUF -----------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip(
        "llama_cpp", reason='llama-cpp-python is not installed: pip install "llm-aligner[llamacpp]"'
    )
    from tests.conftest import require_packaged_model

    require_packaged_model()
    from aligner_core.engines.llamacpp import open_llamacpp
    from aligner_core.loading import DEFAULT_MODEL

    opened, source, tokenizer = open_llamacpp(DEFAULT_MODEL, n_ctx=512, n_seq_max=8)
    assert source.kind == "gguf" and source.gguf_file.endswith(".gguf")
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def aligner(engine):
    from aligner_core import Aligner
    from aligner_core.templates import bind

    return Aligner(engine, bind("aligner-v1", engine.tokenizer), name="smollm2", max_new_tokens=16)


def test_prompt_ids_equal_the_transformers_engine(engine, smollm2):
    """Every official template gives the same prompt ids on both engines, and llama.cpp's own tokenizer agrees."""
    from aligner_core import Aligner
    from aligner_core.engines.base import GenerationParams
    from aligner_core.templates import bind, list_templates

    history = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ]
    native = engine.worker.native
    for name in list_templates():
        ours = Aligner(engine, bind(name, engine.tokenizer))
        theirs = Aligner(smollm2.engine, bind(name, smollm2.engine.tokenizer))
        for question, answer in PAIRS[:3]:
            kwargs = {"history": history} if "history" in name or name == "chat" else {}
            a = ours.prepare(question, answer, GenerationParams(max_new_tokens=16), **kwargs).request
            b = theirs.prepare(question, answer, GenerationParams(max_new_tokens=16), **kwargs).request
            assert a.prompt_ids == b.prompt_ids, name
            assert a.draft_ids == b.draft_ids, name
            add_bos = ours.template.add_special_tokens and native.lib.llama_vocab_get_add_bos(native.vocab)
            assert (
                tuple(native.tokenize(a.prompt, add_special=add_bos, parse_special=True)) == a.prompt_ids
            ), name


def test_greedy_is_deterministic_and_engine_is_named(aligner):
    first = aligner.correct(QUESTION, ANSWER)
    second = aligner.correct(QUESTION, ANSWER)
    assert first.text == second.text and first.completion_tokens == second.completion_tokens
    assert first.metadata["engine"] == "llama.cpp"
    assert first.text and first.prompt_tokens > 50


def test_max_new_tokens_and_stop_strings(aligner):
    short = aligner.correct(QUESTION, ANSWER, max_new_tokens=5)
    assert short.completion_tokens == 5 and short.finish_reason == "length"
    full = aligner.correct(QUESTION, ANSWER, max_new_tokens=24)
    word = full.text.split()[2]
    stopped = aligner.correct(QUESTION, ANSWER, max_new_tokens=24, stop=[word])
    assert word not in stopped.text and stopped.finish_reason == "stop"
    assert full.text.startswith(stopped.text)


def test_correct_batch_keeps_order_and_shares_decodes(aligner, engine):
    before = engine.stats.decodes
    got = aligner.correct_batch(PAIRS, max_new_tokens=[8, 12] * 4)
    assert [c.original for c in got] == [a for _, a in PAIRS]
    assert [c.completion_tokens <= limit for c, limit in zip(got, [8, 12] * 4)] == [True] * 8
    decodes = engine.stats.decodes - before
    assert decodes < sum(c.completion_tokens for c in got)  # served together, not one by one
    assert engine.stats.max_sequences == 8


def test_concurrent_acorrect_share_decodes(aligner, engine):
    engine.stats.sequences.clear()
    engine.stats.max_sequences = 0

    async def main():
        return await asyncio.gather(*(aligner.acorrect(q, a, max_new_tokens=12) for q, a in PAIRS))

    got = asyncio.run(main())
    assert [c.original for c in got] == [a for _, a in PAIRS]
    assert engine.stats.max_sequences >= 2, dict(engine.stats.sequences)  # at least one decode held several


def test_acorrect_batch_and_return_exceptions(aligner):
    got = asyncio.run(aligner.acorrect_batch(PAIRS[:3], max_new_tokens=6))
    assert [c.original for c in got] == [a for _, a in PAIRS[:3]]
    mixed = aligner.correct_batch([PAIRS[0], ("Q?", "  ")], return_exceptions=True, max_new_tokens=6)
    assert mixed[0].text and isinstance(mixed[1], Exception)


def test_streams_add_up_to_the_text(aligner):
    stream = aligner.stream(QUESTION, ANSWER, max_new_tokens=20)
    deltas = list(stream)
    assert "".join(deltas) == stream.correction.text and len(deltas) > 1

    async def main():
        s = aligner.astream(QUESTION, ANSWER, max_new_tokens=20)
        return [d async for d in s], s

    adeltas, astream = asyncio.run(main())
    assert "".join(adeltas) == astream.correction.text == stream.correction.text


def test_a_dropped_stream_stops_generating(aligner, engine):
    stream = aligner.stream(QUESTION, ANSWER, max_new_tokens=400)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while engine.worker.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.worker.active  # the worker let the sequence go at its next token
    assert stream.correction is None


def test_context_overflow(aligner, engine):
    from aligner_core.engines.base import GenerationParams, GenerationRequest
    from aligner_core.errors import ContextOverflowError

    long_answer = "word " * 600
    with pytest.raises(ContextOverflowError):
        aligner.correct(QUESTION, long_answer)
    cut = aligner.correct(QUESTION, long_answer, on_overflow="truncate", max_new_tokens=4)
    assert cut.metadata["truncated"] and cut.completion_tokens <= 4
    request = GenerationRequest(prompt="x", prompt_ids=(1,) * 500, max_new_tokens=100, reserve=100)
    with pytest.raises(ContextOverflowError):
        engine.submit(request, GenerationParams())


def test_sampling_is_seeded(aligner):
    a = aligner.correct(QUESTION, ANSWER, do_sample=True, temperature=0.9, top_p=0.9, top_k=40, seed=7)
    b = aligner.correct(QUESTION, ANSWER, do_sample=True, temperature=0.9, top_p=0.9, top_k=40, seed=7)
    assert a.text == b.text
    penalized = aligner.correct(QUESTION, ANSWER, repetition_penalty=1.3)
    assert penalized.completion_tokens > 0


def test_drafting_engine_reports_its_drafts(engine):
    from aligner_core import Aligner
    from aligner_core.engines.llamacpp import LlamaCppEngine
    from aligner_core.templates import bind

    drafting = LlamaCppEngine(engine.model_path, engine.tokenizer, n_ctx=512, n_seq_max=2, drafting=True)
    try:
        aligner = Aligner(drafting, bind("aligner-v1", engine.tokenizer), max_new_tokens=24)
        out = aligner.correct(QUESTION, ANSWER)
        assert out.metadata["speculative"] is True and out.metadata["decode_steps"] <= out.completion_tokens
        plain = aligner.correct(QUESTION, ANSWER, speculative=False)
        assert "speculative" not in plain.metadata
    finally:
        drafting.close()


def test_close_fails_later_calls(engine):
    from aligner_core import Aligner
    from aligner_core.engines.llamacpp import LlamaCppEngine
    from aligner_core.errors import EngineClosedError
    from aligner_core.templates import bind

    second = LlamaCppEngine(engine.model_path, engine.tokenizer, n_ctx=512, n_seq_max=1)
    aligner = Aligner(second, bind("aligner-v1", engine.tokenizer), max_new_tokens=200)
    pending = [
        second.submit(aligner.prepare(q, a, aligner.defaults).request, aligner.defaults) for q, a in PAIRS[:3]
    ]
    second.close()
    second.close()  # idempotent
    # One slot: the first request was running, the others waiting; whatever had not finished fails clearly.
    assert isinstance(pending[-1].exception(timeout=30), EngineClosedError)
    assert all(f.exception() is None or isinstance(f.exception(), EngineClosedError) for f in pending)
    with pytest.raises(EngineClosedError):
        aligner.correct(QUESTION, ANSWER)
    assert not second.worker.thread.is_alive()


def test_an_engine_dropped_without_close_frees_its_worker(engine):
    """Nothing but the caller holds an engine: its worker thread (and with it the context and KV cache) ends when
    the engine is collected, as a dropped transformers engine frees its model."""
    import gc
    import weakref

    from aligner_core import Aligner
    from aligner_core.engines.llamacpp import LlamaCppEngine
    from aligner_core.templates import bind

    dropped = LlamaCppEngine(engine.model_path, engine.tokenizer, n_ctx=512, n_seq_max=2)
    Aligner(dropped, bind("aligner-v1", engine.tokenizer), max_new_tokens=4).correct(QUESTION, ANSWER)
    thread, ref = dropped.worker.thread, weakref.ref(dropped)
    del dropped
    gc.collect()
    assert ref() is None, "the worker thread must not keep its engine alive"
    thread.join(timeout=60)
    assert not thread.is_alive()


def test_peft_lora_converts_and_loads(engine, tmp_path, monkeypatch):
    """A PEFT adapter whose B matrices are zero changes nothing; converted once, then taken from the cache."""
    np = pytest.importorskip("numpy")
    monkeypatch.setenv("LLM_ALIGNER_CACHE", str(tmp_path / "cache"))
    from safetensors.numpy import save_file

    from aligner_core import Aligner
    from aligner_core.engines.llamacpp import LlamaCppEngine
    from aligner_core.engines.llamacpp.files import lora_file
    from aligner_core.templates import bind

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    tensors = {}
    for layer in range(30):
        for module, rows in (("self_attn.q_proj", 576), ("self_attn.k_proj", 192), ("mlp.down_proj", 576)):
            cols = 1536 if "down" in module else 576
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = np.full((4, cols), 0.01, dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = np.zeros((rows, 4), dtype=np.float32)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    converted = lora_file(adapter, Path(engine.model_path))
    assert lora_file(adapter, Path(engine.model_path)) == converted
    with_lora = LlamaCppEngine(engine.model_path, engine.tokenizer, n_ctx=256, n_seq_max=1, lora=[converted])
    try:
        base = Aligner(engine, bind("aligner-v1", engine.tokenizer), max_new_tokens=10).correct(
            QUESTION, ANSWER
        )
        got = Aligner(with_lora, bind("aligner-v1", engine.tokenizer), max_new_tokens=10).correct(
            QUESTION, ANSWER
        )
        assert got.text == base.text
    finally:
        with_lora.close()


# -- wired into the library: Aligner.from_pretrained(engine="llama.cpp"), the default, the CLI ---------------


@pytest.fixture(scope="module")
def wired():
    """``Aligner.from_pretrained(engine="llama.cpp")`` on the packaged default, as a user builds it."""
    pytest.importorskip(
        "llama_cpp", reason='llama-cpp-python is not installed: pip install "llm-aligner[llamacpp]"'
    )
    from tests.conftest import require_packaged_model

    require_packaged_model()
    from aligner_core import Aligner
    from aligner_core.loading import DEFAULT_MODEL

    aligner = Aligner.from_pretrained(
        DEFAULT_MODEL, engine="llama.cpp", max_new_tokens=16, n_ctx=512, n_seq_max=8
    )
    yield aligner
    aligner.close()


def test_from_pretrained_serves_every_entry_point(wired):
    assert wired.engine.name == "llama.cpp" and wired.template.name == "chat"
    one = wired.correct(QUESTION, ANSWER)
    assert one.metadata["engine"] == "llama.cpp" and one.text
    batch = wired.correct_batch(PAIRS[:4])
    singles = [wired.correct(q, a) for q, a in PAIRS[:4]]
    assert [c.text for c in batch] == [c.text for c in singles]  # greedy: a batch equals one-by-one calls
    assert batch[0].text == one.text
    got = asyncio.run(wired.acorrect(QUESTION, ANSWER))
    assert got.text == one.text
    stream = wired.stream(QUESTION, ANSWER)
    assert "".join(stream) == stream.correction.text == one.text


def test_from_pretrained_gives_the_transformers_engines_prompt_ids(wired, smollm2):
    """The template chosen for the packaged default is the same on both engines, and so are the prompt ids."""
    from aligner_core.engines.base import GenerationParams

    assert smollm2.engine.name == "transformers" and wired.template.name == smollm2.template.name
    params = GenerationParams(max_new_tokens=16)
    for question, answer in PAIRS:
        ours = wired.prepare(question, answer, params).request
        theirs = smollm2.prepare(question, answer, params).request
        assert ours.prompt_ids == theirs.prompt_ids and ours.draft_ids == theirs.draft_ids


def test_the_default_engine_follows_the_machine(wired):
    """Without ``engine=``: llama.cpp for the packaged GGUF on a CPU-only machine; ``engine="transformers"`` and a
    transformers-only option keep the transformers engine (checked without loading it twice)."""
    from aligner_core import Aligner
    from aligner_core.engines.choosing import choose_engine, has_accelerator
    from aligner_core.loading import DEFAULT_MODEL

    if has_accelerator():
        pytest.skip("an accelerator is present: the default is the transformers engine")
    assert choose_engine(DEFAULT_MODEL) == "llama.cpp"
    assert choose_engine(DEFAULT_MODEL, dtype="float32") == "transformers"
    with Aligner.from_pretrained(DEFAULT_MODEL, max_new_tokens=8, n_ctx=256, n_seq_max=1) as default:
        assert default.engine.name == "llama.cpp"
        assert (
            default.correct(QUESTION, ANSWER).text == wired.correct(QUESTION, ANSWER, max_new_tokens=8).text
        )


def test_options_that_do_not_apply_are_refused(wired):
    from aligner_core import Aligner
    from aligner_core.loading import DEFAULT_MODEL

    for option in (
        {"device_map": "auto"},
        {"quantization": "4bit"},
        {"dtype": "float16"},
        {"device": "cuda"},
    ):
        with pytest.raises(ValueError, match="engine='llama.cpp' does not take"):
            Aligner.from_pretrained(DEFAULT_MODEL, engine="llama.cpp", **option)
    with pytest.raises(TypeError):
        Aligner.from_pretrained(DEFAULT_MODEL, engine="llama.cpp", no_such_option=1)


def test_cli_correct_with_engine_llama_cpp(wired, tmp_path):
    import subprocess
    import sys

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in PAIRS[:3]))
    out = tmp_path / "out.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "aligner_core", "correct", str(inp), "-o", str(out), "--engine", "llama.cpp"]
        + ["--max-new-tokens", "16", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == [q for q, _ in PAIRS[:3]]
    assert [r["correction"] for r in rows] == [c.text for c in wired.correct_batch(PAIRS[:3])]
    assert "llama.cpp engine" in run.stderr
