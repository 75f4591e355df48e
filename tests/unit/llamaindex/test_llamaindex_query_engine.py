"""AlignedQueryEngine on the tiny model: plain, async and streaming answers, error policy, tracing."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import SummaryIndex  # noqa: E402
from llama_index.core.base.response.schema import (  # noqa: E402
    AsyncStreamingResponse,
    PydanticResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.bridge.pydantic import BaseModel  # noqa: E402
from llama_index.core.prompts import PromptTemplate  # noqa: E402
from llama_index.core.query_engine import CustomQueryEngine  # noqa: E402
from llama_index.core.schema import QueryBundle  # noqa: E402

from aligner_core import AlignerError, ContextOverflowError, GenerationOptionError, UnsafeStreamError  # noqa: E402
from llamaindex_aligner import AlignedQueryEngine  # noqa: E402
from tests.fixtures.llamaindex_helpers import (  # noqa: E402
    ANSWER,
    OVERLONG,
    QUESTION,
    FixedAnswerEngine,
    recording,
    span_names,
    text_nodes,
    tiny_llm,
)


def expected(aligner, answer=ANSWER, nodes=(), **gen):
    """What the Aligner writes for the answer, grounded on the response's source nodes."""
    context = [n.node.get_content() for n in nodes] or None
    fix = aligner.correct(QUESTION, answer, context=context, **gen)
    return fix.text if fix.text.strip() else answer


def check_info(info, aligner, answer=ANSWER):
    assert info["model"] == aligner.name and info["error"] is None
    assert (
        info["original"] == answer if not info["changed"] else "original" not in info
    )  # the replaced answer stays
    assert info["text"].strip() and "question" not in info and "pending" not in info
    assert {
        "changed",
        "similarity",
        "prompt_tokens",
        "completion_tokens",
        "finish_reason",
        "latency_s",
    } <= set(info)
    if info.get("empty_correction"):  # an empty correction is never better: the original is served
        assert info["text"] == answer and info["changed"] is False


def test_query_returns_the_inner_response_corrected(tiny_aligner):
    nodes = text_nodes()
    engine = AlignedQueryEngine(FixedAnswerEngine(nodes=nodes), tiny_aligner)
    with recording() as (events, spans):
        response = engine.query(QUESTION)
    assert isinstance(response, Response)
    assert response.response == expected(tiny_aligner, nodes=nodes)
    assert (
        response.metadata["aligner"]["metadata"]["context_items"] == 3
    )  # the retrieved nodes ground the correction
    assert [n.node.node_id for n in response.source_nodes] == ["n1", "n2", "n3"]
    assert all(a is b for a, b in zip(response.source_nodes, nodes))  # source nodes untouched
    assert response.metadata["inner"] == "kept"
    check_info(response.metadata["aligner"], tiny_aligner)
    assert response.metadata["aligner"]["text"] == response.response
    (start,) = events.of("AlignerStartEvent")
    (end,) = events.of("AlignerEndEvent")
    assert start.component == end.component == "query_engine" and start.query == QUESTION
    assert end.num_errors == 0 and end.completion_tokens == response.metadata["aligner"]["completion_tokens"]
    assert {"AlignedQueryEngine.query", "AlignedQueryEngine._query"} <= set(span_names(spans))


def test_aquery_awaits_the_core(tiny_aligner):
    engine = AlignedQueryEngine(FixedAnswerEngine(nodes=text_nodes()), tiny_aligner)

    async def main():
        return await asyncio.gather(engine.aquery(QUESTION), engine.aquery(QUESTION))

    with recording() as (events, spans):
        first, second = asyncio.run(main())
    assert first.response == second.response == expected(tiny_aligner, nodes=text_nodes())
    check_info(first.metadata["aligner"], tiny_aligner)
    assert len(first.source_nodes) == 3
    assert span_names(spans).count("AlignedQueryEngine._aquery") == 2
    assert len(events.of("AlignerEndEvent")) == 2


def test_generation_options_apply(tiny_aligner):
    engine = AlignedQueryEngine(FixedAnswerEngine(), tiny_aligner, generation_kwargs={"max_new_tokens": 3})
    response = engine.query(QUESTION)
    assert response.metadata["aligner"]["completion_tokens"] <= 3
    assert response.response == expected(tiny_aligner, max_new_tokens=3)


def test_streaming_returns_a_stream_of_the_correction(tiny_aligner):
    engine = AlignedQueryEngine(FixedAnswerEngine(nodes=text_nodes()), tiny_aligner, streaming=True)
    with recording() as (events, _):
        response = engine.query(QUESTION)
        assert isinstance(response, StreamingResponse)
        assert response.metadata["aligner"]["pending"] is True  # filled in once the stream is read
        deltas = list(response.response_gen)
    info = response.metadata["aligner"]
    check_info(info, tiny_aligner)
    assert "".join(deltas) == info["text"]
    assert len(response.source_nodes) == 3 and response.metadata["inner"] == "kept"
    assert len(events.of("AlignerEndEvent")) == 1


def test_async_streaming_response(tiny_aligner):
    engine = AlignedQueryEngine(FixedAnswerEngine(), tiny_aligner, streaming=True)

    async def main():
        response = await engine.aquery(QUESTION)
        assert isinstance(response, AsyncStreamingResponse)
        return response, [d async for d in response.async_response_gen()]

    response, deltas = asyncio.run(main())
    check_info(response.metadata["aligner"], tiny_aligner)
    assert "".join(deltas) == response.metadata["aligner"]["text"] == response.response_txt


def test_an_inner_stream_is_refused_unless_accepted(tiny_aligner):
    for stream in ("sync", "async"):
        inner = FixedAnswerEngine(nodes=text_nodes(), stream=stream)
        with pytest.raises(
            UnsafeStreamError, match="streaming=True"
        ):  # its tokens would reach instrumentation
            asyncio.run(AlignedQueryEngine(inner, tiny_aligner).aquery(QUESTION))
    with pytest.raises(UnsafeStreamError, match="stream_uncorrected=True"):
        AlignedQueryEngine(FixedAnswerEngine(stream="sync"), tiny_aligner).query(QUESTION)
    accepted = AlignedQueryEngine(
        FixedAnswerEngine(nodes=text_nodes(), stream="sync"), tiny_aligner, stream_uncorrected=True
    )
    response = accepted.query(QUESTION)
    assert isinstance(response, StreamingResponse)  # read to the end, corrected, streamed
    assert (
        "".join(response.response_gen)
        == response.metadata["aligner"]["text"]
        == expected(tiny_aligner, nodes=text_nodes())
    )
    assert response.metadata["inner"] == "kept"

    async def main():
        r = await AlignedQueryEngine(
            FixedAnswerEngine(stream="async"), tiny_aligner, stream_uncorrected=True
        ).aquery(QUESTION)
        return r, "".join([d async for d in r.async_response_gen()])

    response, text = asyncio.run(main())
    assert isinstance(response, AsyncStreamingResponse) and text == response.metadata["aligner"]["text"]


def test_empty_and_structured_answers_pass_through(tiny_aligner):
    empty = AlignedQueryEngine(FixedAnswerEngine(answer="  "), tiny_aligner).query(QUESTION)
    assert empty.response == "  " and empty.metadata["aligner"]["skipped"] == "empty_answer"

    class Capital(BaseModel):
        city: str

    class StructuredEngine(CustomQueryEngine):
        def custom_query(self, query_str: str) -> PydanticResponse:
            return PydanticResponse(Capital(city="Canberra"))

    structured = AlignedQueryEngine(StructuredEngine(), tiny_aligner).query(QUESTION)
    assert isinstance(structured, PydanticResponse) and structured.response.city == "Canberra"
    assert structured.metadata["aligner"]["skipped"] == "structured_output"


def test_on_error_raise_and_passthrough(tiny_aligner):
    inner = FixedAnswerEngine(answer=OVERLONG, nodes=text_nodes())
    with pytest.raises(ContextOverflowError):
        AlignedQueryEngine(inner, tiny_aligner).query(QUESTION)

    engine = AlignedQueryEngine(inner, tiny_aligner, on_error="passthrough")
    with recording() as (events, _):
        response = engine.query(QUESTION)
    assert response.response == OVERLONG and len(response.source_nodes) == 3
    info = response.metadata["aligner"]
    assert info["changed"] is False and info["error"].startswith("ContextOverflowError")
    assert info["error_type"] == "ContextOverflowError" and info["original"] == info["text"] == OVERLONG
    (end,) = events.of("AlignerEndEvent")
    assert end.num_errors == 1 and end.error == info["error"]

    aresponse = asyncio.run(engine.aquery(QUESTION))
    assert aresponse.response == OVERLONG and aresponse.metadata["aligner"]["error"] == info["error"]


def test_on_overflow_truncate_corrects_a_long_answer(tiny_aligner):
    inner = FixedAnswerEngine(answer=OVERLONG)
    response = AlignedQueryEngine(
        inner, tiny_aligner, generation_kwargs={"on_overflow": "truncate"}, include_original=True
    ).query(QUESTION)
    info = response.metadata["aligner"]
    assert info["error"] is None and info["metadata"]["truncated"] is True and info["original"] == OVERLONG


def test_on_error_with_streams(tiny_aligner):
    inner = FixedAnswerEngine(answer=OVERLONG)
    streamed = AlignedQueryEngine(inner, tiny_aligner, on_error="passthrough", streaming=True).query(QUESTION)
    assert "".join(streamed.response_gen) == OVERLONG
    assert streamed.metadata["aligner"]["error"].startswith("ContextOverflowError")

    with pytest.raises(ContextOverflowError):  # raised by query(), as for a plain answer
        AlignedQueryEngine(inner, tiny_aligner, streaming=True).query(QUESTION)

    async def main():
        response = await AlignedQueryEngine(
            inner, tiny_aligner, on_error="passthrough", streaming=True
        ).aquery(QUESTION)
        return response, await response.get_response()

    response, final = asyncio.run(main())
    assert final.response == OVERLONG and response.metadata["aligner"]["error_type"] == "ContextOverflowError"


def test_a_closed_aligner_passes_answers_through(tiny_aligner):
    tiny_aligner.close()  # a real outage: the Aligner's worker is gone
    engine = AlignedQueryEngine(FixedAnswerEngine(nodes=text_nodes()), tiny_aligner, on_error="passthrough")
    response = asyncio.run(engine.aquery(QUESTION))
    assert (
        response.response == ANSWER and response.metadata["aligner"]["error_type"] == "SchedulerClosedError"
    )
    streaming = AlignedQueryEngine(FixedAnswerEngine(), tiny_aligner, on_error="passthrough", streaming=True)
    assert "".join(streaming.query(QUESTION).response_gen) == ANSWER
    with pytest.raises(AlignerError, match="closed"):
        asyncio.run(AlignedQueryEngine(FixedAnswerEngine(), tiny_aligner).aquery(QUESTION))


def test_a_stream_closed_early_stops_cleanly(tiny_aligner):
    response = AlignedQueryEngine(FixedAnswerEngine(), tiny_aligner, streaming=True).query(QUESTION)
    gen = response.response_gen
    next(gen, None)
    gen.close()  # stops the correction mid-way
    assert tiny_aligner.correct(QUESTION, ANSWER).completion_tokens > 0  # and the Aligner keeps serving


def test_settings_are_checked(tiny_aligner):
    inner = FixedAnswerEngine()
    engine = AlignedQueryEngine(inner, tiny_aligner)
    assert AlignedQueryEngine.class_name() == "AlignedQueryEngine"
    assert engine.query_engine is inner and engine.aligner is tiny_aligner
    with pytest.raises(TypeError, match="BaseQueryEngine"):
        AlignedQueryEngine(object(), tiny_aligner)
    with pytest.raises(TypeError, match="Aligner"):
        AlignedQueryEngine(inner, object())
    with pytest.raises(ValueError, match="on_error"):
        AlignedQueryEngine(inner, tiny_aligner, on_error="ignore")
    with pytest.raises(GenerationOptionError, match="max_tokens"):
        AlignedQueryEngine(inner, tiny_aligner, generation_kwargs={"max_tokens": 8})


def test_wraps_a_retriever_query_engine(tiny_aligner):
    llm = tiny_llm(tiny_aligner)
    qa = PromptTemplate("Context: {context_str}\nQ: {query_str}\nA:")
    inner = SummaryIndex([n.node for n in text_nodes()]).as_query_engine(llm=llm, text_qa_template=qa)
    engine = AlignedQueryEngine(inner, tiny_aligner, include_original=True)
    assert "query_engine:response_synthesizer:text_qa_template" in engine.get_prompts()
    plain = inner.query(QUESTION)
    response = engine.query(QUESTION)
    assert response.metadata["aligner"]["original"] == plain.response  # greedy: the same inner answer
    assert [n.node.node_id for n in response.source_nodes] == [n.node.node_id for n in plain.source_nodes]
    assert len(engine.retrieve(QueryBundle(QUESTION))) == 3
