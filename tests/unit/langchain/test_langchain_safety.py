"""Issue 11 on the LangChain side: only the correction streams, standard parameters, any chat Runnable as
``llm=``, typed schemas, traces while streaming, ``json_schema`` structured output, ``max_concurrency``.

The upstream is one of langchain-core's fake chat models (it streams word by word when asked), or a real
``ChatHuggingFace`` over a tiny model saved to disk; the corrector is the tiny Aligner.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_core.tracers.run_collector import RunCollectorCallbackHandler
from pydantic import BaseModel, ValidationError

from aligner_core import Aligner, CorrectionTimeoutError, EngineUnavailableError, GenerationOptionError
from langchain_aligner import UNCORRECTED_TAG, AlignedChatModel, AlignerRunnable, with_aligner
from tests.fixtures.langchain_helpers import QUESTION, tree

RAW = "RAWTOKEN alpha RAWTOKEN beta RAWTOKEN gamma"
PROMPT = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")])


@pytest.fixture(scope="module")
def aligner(tiny_model, tiny_tokenizer):
    a = Aligner.from_model(tiny_model, tiny_tokenizer, template="aligner-v1", name="tiny", max_new_tokens=8)
    yield a
    a.close()


def fake(text: str = RAW, n: int = 1) -> GenericFakeChatModel:
    """An upstream that streams its answer word by word whenever a streaming handler listens."""
    return GenericFakeChatModel(messages=iter([AIMessage(text) for _ in range(n)]))


class TokenCounter(BaseCallbackHandler):
    """Counts ``on_llm_new_token`` per run name, as a UI forwarding tokens would see them."""

    def __init__(self) -> None:
        self.names: dict[Any, str] = {}
        self.tokens: list[tuple[str, str]] = []

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: Any, **kwargs: Any) -> None:
        self.names[run_id] = kwargs.get("name") or serialized.get("name") or "?"

    def on_llm_new_token(self, token: str, *, run_id: Any, **kwargs: Any) -> None:
        self.tokens.append((self.names.get(run_id, "?"), token))


async def stream_events(runnable: Any, value: Any, **config: Any) -> list[dict[str, Any]]:
    return [e async for e in runnable.astream_events(value, config or None, version="v2")]


def chunk_text(event: dict[str, Any]) -> str:
    chunk = event["data"].get("chunk")
    return chunk if isinstance(chunk, str) else getattr(chunk, "text", "") or ""


def no_raw_stream(events: list[dict[str, Any]]) -> None:
    streamed = [e for e in events if e["event"].endswith("_stream")]
    assert streamed, "nothing streamed"
    leaks = [(e["event"], e["name"], chunk_text(e)) for e in streamed if "RAWTOKEN" in chunk_text(e)]
    assert leaks == []
    assert all(UNCORRECTED_TAG not in e["tags"] for e in streamed)


# -- 1. the uncorrected answer never streams ----------------------------------------------------


def test_with_aligner_astream_events_stream_only_the_correction(aligner):
    chain = with_aligner(PROMPT | fake(), aligner=aligner)
    events = asyncio.run(stream_events(chain, {"question": QUESTION}))
    no_raw_stream(events)
    tokens = [e for e in events if e["event"] == "on_chat_model_stream"]
    assert {e["name"] for e in tokens} == {"Aligner"}  # the correction streams as chat-model tokens
    corrected = aligner.correct(QUESTION, RAW).text
    assert "".join(chunk_text(e) for e in tokens) == corrected
    assert events[-1]["event"] == "on_chain_end" and events[-1]["data"]["output"].text == corrected
    assert not [
        e for e in events if e["name"] == "GenericFakeChatModel"
    ]  # the upstream is off the event stream


def test_with_aligner_upstream_is_still_traced_and_tagged(aligner):
    collector = RunCollectorCallbackHandler()
    with_aligner(PROMPT | fake(), aligner=aligner).invoke(
        {"question": QUESTION}, config={"callbacks": [collector]}
    )
    upstream = collector.traced_runs[0].child_runs[0]
    assert (
        upstream.name == "RunnableSequence"
        and UNCORRECTED_TAG in upstream.tags
        and "nostream" in upstream.tags
    )
    assert upstream.child_runs[-1].outputs["generations"][0][0]["text"] == RAW  # tracers keep the original


def test_aligned_chat_model_in_a_chain_streams_only_its_correction(aligner):
    chain = PROMPT | AlignedChatModel(llm=fake(), aligner=aligner)
    events = asyncio.run(stream_events(chain, {"question": QUESTION}))
    no_raw_stream(events)
    tokens = [e for e in events if e["event"] == "on_chat_model_stream"]
    assert {e["name"] for e in tokens} == {
        "AlignedChatModel"
    }  # no duplicate tokens from the nested Aligner run
    final = next(e for e in events if e["event"] == "on_chat_model_end" and e["name"] == "AlignedChatModel")
    system = [
        {"role": "system", "content": "Be brief."}
    ]  # the prompt's system message is the correction's history
    expected = aligner.correct(QUESTION, RAW, history=system).text
    assert "".join(chunk_text(e) for e in tokens) == final["data"]["output"].text == expected


@pytest.mark.parametrize("how", ["stream", "invoke-streaming"])
def test_a_token_callback_sees_only_corrected_tokens(aligner, how):
    counter = TokenCounter()
    options = (
        {"streaming": True} if how == "invoke-streaming" else {}
    )  # streaming=False would turn stream() off
    chat = AlignedChatModel(llm=fake(), aligner=aligner, **options)
    if how == "stream":
        text = "".join(c.text for c in chat.stream(QUESTION, config={"callbacks": [counter]}))
    else:
        text = chat.invoke(QUESTION, config={"callbacks": [counter]}).text
    assert counter.tokens and {name for name, _ in counter.tokens} == {"AlignedChatModel"}
    assert "".join(t for _, t in counter.tokens) == text == aligner.correct(QUESTION, RAW).text


def test_with_aligner_token_callback_and_sync_stream(aligner):
    counter = TokenCounter()
    chain = with_aligner(PROMPT | fake() | StrOutputParser(), aligner=aligner)
    deltas = list(chain.stream({"question": QUESTION}, config={"callbacks": [counter]}))
    assert "".join(deltas) == aligner.correct(QUESTION, RAW).text
    assert {name for name, _ in counter.tokens} == {"Aligner"} and "RAWTOKEN" not in "".join(
        t for _, t in counter.tokens
    )


class StreamingFake(GenericFakeChatModel):
    """An upstream built with ``streaming=True`` streams its tokens to callbacks even inside ``invoke``."""

    streaming: bool = False


@pytest.mark.parametrize("wrap", ["chat_model", "with_aligner"])
def test_an_upstream_that_always_streams_reaches_no_token_callback(aligner, wrap):
    """No stream surface listens here, so only muting keeps the upstream's own tokens from a token handler."""
    for opted_in in (False, True):
        counter, upstream = TokenCounter(), StreamingFake(messages=iter([AIMessage(RAW)]), streaming=True)
        if wrap == "chat_model":
            aligned: Any = AlignedChatModel(llm=upstream, aligner=aligner, stream_uncorrected=opted_in)
        else:
            aligned = with_aligner(upstream, aligner=aligner, stream_uncorrected=opted_in)
        aligned.invoke(QUESTION, config={"callbacks": [counter]})
        assert ("RAWTOKEN" in "".join(t for _, t in counter.tokens)) is opted_in


def test_stream_uncorrected_is_an_explicit_opt_in(aligner):
    chat = AlignedChatModel(llm=fake(), aligner=aligner, stream_uncorrected=True)
    events = asyncio.run(stream_events(chat, QUESTION))
    raw = [e for e in events if e["event"] == "on_chat_model_stream" and e["name"] == "GenericFakeChatModel"]
    assert "".join(chunk_text(e) for e in raw) == RAW and all(UNCORRECTED_TAG in e["tags"] for e in raw)
    chain = with_aligner(PROMPT | fake(), aligner=aligner, stream_uncorrected=True)
    events = asyncio.run(stream_events(chain, {"question": QUESTION}))
    assert any("RAWTOKEN" in chunk_text(e) for e in events if e["event"] == "on_chat_model_stream")


# -- 2. standard chat-model parameters ----------------------------------------------------------


def test_standard_parameters_are_accepted(aligner):
    chat = AlignedChatModel(
        llm=fake(),
        aligner=aligner,
        timeout=30,
        max_retries=1,
        temperature=0,
        max_tokens=5,
        stop=[],
        model="tiny",
    )
    assert chat.timeout == 30 and chat.max_retries == 1 and chat.model_name == "tiny"
    assert chat.invoke(QUESTION).response_metadata["aligner"]["completion_tokens"] <= 5
    with pytest.raises(ValidationError, match="timeout"):
        AlignedChatModel(llm=fake(), aligner=aligner, timeout=-1)


def test_timeout_bounds_the_correction(aligner):
    stage = AlignerRunnable(
        aligner=aligner, question=QUESTION, timeout=1e-4, generation_kwargs={"max_new_tokens": 64}
    )
    with pytest.raises(CorrectionTimeoutError, match="timeout"):
        stage.invoke(RAW)
    with pytest.raises(CorrectionTimeoutError):
        asyncio.run(stage.ainvoke(RAW))
    chat = AlignedChatModel(llm=fake(), aligner=aligner, timeout=1e-4, max_tokens=64, on_error="passthrough")
    out = chat.invoke(QUESTION)
    assert out.text == RAW and out.response_metadata["aligner"]["error_type"] == "CorrectionTimeoutError"
    with pytest.raises(GenerationOptionError, match="timeout"):
        aligner.correct(QUESTION, RAW, timeout="soon")


def test_max_retries_retries_transient_failures_only(aligner, monkeypatch):
    original, calls = aligner.correct, []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise EngineUnavailableError("engine restarting")
        return original(*args, **kwargs)

    monkeypatch.setattr(aligner, "correct", flaky)
    chat = AlignedChatModel(llm=fake(), aligner=aligner, max_retries=1)
    assert chat.invoke(QUESTION).text == original(QUESTION, RAW).text and len(calls) == 2
    calls.clear()
    with pytest.raises(EngineUnavailableError):
        AlignedChatModel(llm=fake(), aligner=aligner).invoke(QUESTION)  # max_retries unset: no retry
    assert len(calls) == 1


def test_max_retries_retries_the_failed_items_of_a_batch(aligner, monkeypatch):
    original, sizes = aligner.correct_batch, []

    def flaky(pairs: Any, **kwargs: Any) -> Any:
        sizes.append(len(pairs))
        out = original(pairs, **kwargs)
        return [EngineUnavailableError("engine restarting"), *out[1:]] if len(sizes) == 1 else out

    monkeypatch.setattr(aligner, "correct_batch", flaky)
    answers = [RAW, "Spiders have eight legs."]
    out = AlignerRunnable(aligner=aligner, question=QUESTION, max_retries=1).batch(answers)
    assert out == [aligner.correct(QUESTION, a).text for a in answers] and sizes == [2, 1]


def test_model_names_the_aligner_when_none_is_passed(tiny_model_dir):
    chat = AlignedChatModel(llm=fake(), model=str(tiny_model_dir), max_tokens=4, include_original=True)
    try:
        assert (
            isinstance(chat.aligner, Aligner)
            and chat.invoke(QUESTION).response_metadata["aligner"]["original"] == RAW
        )
    finally:
        chat.aligner.close()
    with pytest.raises(ValidationError, match="needs a corrector"):
        AlignedChatModel(llm=fake())


# -- 3. any chat-model Runnable as llm= ---------------------------------------------------------


@pytest.mark.parametrize(
    "wrap",
    [
        lambda up: up.with_retry(stop_after_attempt=2),
        lambda up: up.with_fallbacks([fake()]),
        lambda up: up.bind(stop=["never"]),
        lambda up: up.with_config(tags=["upstream"]),
    ],
    ids=["with_retry", "with_fallbacks", "bind", "with_config"],
)
def test_llm_may_be_any_chat_runnable(aligner, wrap):
    chat = AlignedChatModel(llm=wrap(fake()), aligner=aligner, include_original=True)
    assert chat.upstream_name == "generic-fake-chat-model"
    out = chat.invoke(QUESTION)
    assert (
        out.response_metadata["aligner"]["original"] == RAW
        and out.text == aligner.correct(QUESTION, RAW).text
    )


def test_llm_may_be_a_configurable_init_chat_model(aligner, tiny_model_dir):
    """``init_chat_model()`` with no model: the model is chosen per call, here a real ChatHuggingFace."""
    pytest.importorskip("langchain_huggingface")
    from langchain.chat_models import init_chat_model

    configurable = init_chat_model(max_tokens=3)
    chat = AlignedChatModel(llm=configurable, aligner=aligner, include_original=True)
    config = {
        "configurable": {
            "model": str(tiny_model_dir),
            "model_provider": "huggingface",
            "task": "text-generation",
        }
    }
    out = chat.invoke(QUESTION, config=config)
    assert isinstance(out, AIMessage) and "original" in out.response_metadata["aligner"]


# -- 4. typed schemas -----------------------------------------------------------------------------


def test_with_aligner_publishes_the_chains_schemas_and_works_as_a_tool(aligner):
    chain = with_aligner(PROMPT | fake() | StrOutputParser(), aligner=aligner)
    schema = chain.get_input_jsonschema()
    assert schema["properties"].keys() == {"question"} and "root" not in json.dumps(schema)
    assert chain.get_output_jsonschema()["type"] == "string"
    as_tool = chain.as_tool(name="aligned_answer", description="Answer, corrected by the Aligner.")
    assert as_tool.args.keys() == {"question"}
    assert as_tool.invoke({"question": QUESTION}) == aligner.correct(QUESTION, RAW).text


def test_aligner_runnable_schemas_are_typed(aligner):
    stage = AlignerRunnable(aligner=aligner, question_key="q", answer_key="draft")
    text = json.dumps(stage.get_input_jsonschema())
    assert '"draft"' in text and '"q"' in text and '"string"' in text and "AIMessage" in text
    assert "AIMessage" in json.dumps(stage.get_output_jsonschema())
    configurable = stage.config_schema().model_json_schema()
    assert "q" in json.dumps(configurable["$defs"]["Configurable"]["properties"])
    assert (
        stage.invoke("an answer", config={"configurable": {"q": QUESTION}})
        == aligner.correct(QUESTION, "an answer").text
    )


# -- 5. traces while streaming ------------------------------------------------------------------


def test_streaming_records_the_nested_runs_like_invoke(aligner):
    shape = (
        "AlignedChatModel",
        "llm",
        [("GenericFakeChatModel", "llm", []), ("AlignerRunnable", "chain", [("Aligner", "llm", [])])],
    )
    for how in ("invoke", "stream", "astream"):
        collector = RunCollectorCallbackHandler()
        chat = AlignedChatModel(llm=fake(), aligner=aligner)
        config = {"callbacks": [collector]}
        if how == "invoke":
            chat.invoke(QUESTION, config=config)
        elif how == "stream":
            list(chat.stream(QUESTION, config=config))
        else:

            async def run(chat: AlignedChatModel = chat, config: dict[str, Any] = config) -> None:
                async for _ in chat.astream(QUESTION, config=config):
                    pass

            asyncio.run(run())
        (root,) = collector.traced_runs
        assert tree(root) == shape, how
        aligner_run = root.child_runs[-1].child_runs[0]
        usage = aligner_run.outputs["generations"][0][0]["message"]["kwargs"]["usage_metadata"]
        assert usage["output_tokens"] > 0 and aligner_run.extra["metadata"]["ls_provider"] == "aligner"


# -- 6. structured output and max_concurrency -----------------------------------------------------


class _Answer(BaseModel):
    text: str


class _Structured(GenericFakeChatModel):
    """An upstream whose ``with_structured_output`` records the method it was asked for (and honours include_raw)."""

    methods: list[str] = []

    def with_structured_output(self, schema: Any, *, include_raw: bool = False, **kwargs: Any) -> Any:
        self.methods.append(kwargs.get("method"))
        raw = AIMessage('{"text": "structured"}')
        out = {"raw": raw, "parsed": schema(text="structured"), "parsing_error": None}
        return RunnableLambda(lambda _: out if include_raw else out["parsed"])


def test_with_structured_output_honours_the_method_and_passes_through(aligner):
    upstream = _Structured(messages=iter([]))
    chat = AlignedChatModel(llm=upstream, aligner=aligner)
    assert chat.with_structured_output(_Answer, method="json_schema").invoke(QUESTION) == _Answer(
        text="structured"
    )
    raw = chat.with_structured_output(_Answer, method="json_mode", include_raw=True).invoke(QUESTION)
    assert raw["parsed"] == _Answer(text="structured") and raw["raw"].content == '{"text": "structured"}'
    assert raw["raw"].response_metadata["aligner"]["skipped"] == "structured_output"
    assert upstream.methods == ["json_schema", "json_mode"]
    with pytest.raises(ValueError, match="method"):
        chat.with_structured_output(_Answer, method="xml")


def test_with_aligner_batch_respects_max_concurrency(aligner, monkeypatch):
    sizes: list[int] = []
    original = aligner.correct_batch

    def record(pairs: Any, **kwargs: Any) -> Any:
        sizes.append(len(pairs))
        return original(pairs, **kwargs)

    monkeypatch.setattr(aligner, "correct_batch", record)
    questions = [f"Question {i}?" for i in range(5)]
    chain = with_aligner(RunnableLambda(lambda x: f"answer to {x['question']}"), aligner=aligner)
    out = chain.batch([{"question": q} for q in questions], config={"max_concurrency": 2})
    assert out == [aligner.correct(q, f"answer to {q}").text for q in questions]
    assert sizes == [2, 2, 1]
