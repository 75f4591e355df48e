"""LlamaIndex conventions: serialization through ``to_dict``/``from_dict``, and the Aligner's generations as LLM calls
LlamaIndex reports (instrumentation events, callback-manager events, exact token counts)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.callbacks import CallbackManager, CBEventType, TokenCountingHandler  # noqa: E402

from llamaindex_aligner import AlignedQueryEngine, AlignerNodePostprocessor  # noqa: E402
from tests.fixtures.llamaindex_helpers import ANSWER, QUESTION, FixedAnswerEngine, recording, text_nodes  # noqa: E402


def test_postprocessor_round_trips_through_a_dict(tiny_aligner):
    pp = AlignerNodePostprocessor(
        aligner=tiny_aligner, top_n=2, on_error="passthrough", generation_kwargs={"max_new_tokens": 4}
    )
    data = pp.to_dict()
    assert data["aligner"] == {"model": "", "template": "aligner-v1", "engine": "transformers"}
    again = AlignerNodePostprocessor.from_dict(data, aligner=tiny_aligner)
    assert again.to_dict() == data and again.aligner is tiny_aligner
    assert AlignerNodePostprocessor.from_json(pp.to_json(), aligner=tiny_aligner).to_dict() == data
    with pytest.raises(
        ValueError, match="aligner=aligner"
    ):  # an Aligner built from objects has no id to reload
        AlignerNodePostprocessor.from_dict(data)
    with pytest.raises(ValueError, match="server"):
        AlignerNodePostprocessor.from_dict({**data, "aligner": {"model": "m", "engine": "server"}})


def test_postprocessor_generations_are_llm_events(tiny_aligner):
    counter = TokenCountingHandler(tokenizer=str.split)
    pp = AlignerNodePostprocessor(aligner=tiny_aligner, callback_manager=CallbackManager([counter]))
    with recording() as (events, _):
        pp.postprocess_nodes(text_nodes(), query_str=QUESTION)
    (end,) = events.of("AlignerEndEvent")
    starts, ends = events.of("LLMCompletionStartEvent"), events.of("LLMCompletionEndEvent")
    assert len(starts) == len(ends) == 3 and all(s.model_dict["class_name"] == "Aligner" for s in starts)
    assert (
        starts[0].model_dict["component"] == "node_postprocessor"
        and starts[0].model_dict["template"] == "aligner-v1"
    )
    order = [e.class_name() for e in events.events if e.class_name().startswith("LLMCompletion")]
    assert order[:3] == ["LLMCompletionStartEvent"] * 3  # one batch: each node's call opens before it runs
    assert QUESTION in starts[0].prompt and "Sydney" in starts[0].prompt  # the Aligner's rendered prompt
    assert len(counter.llm_token_counts) == 3
    assert counter.prompt_llm_token_count == end.prompt_tokens  # exact counts, from the Corrections
    assert counter.completion_llm_token_count == end.completion_tokens > 0


def test_query_engine_correction_is_an_llm_event(tiny_aligner):
    counter = TokenCountingHandler(tokenizer=str.split)
    engine = AlignedQueryEngine(
        FixedAnswerEngine(), tiny_aligner, callback_manager=CallbackManager([counter])
    )
    with recording() as (events, _):
        response = engine.query(QUESTION)
        streamed = AlignedQueryEngine(
            FixedAnswerEngine(), tiny_aligner, streaming=True, callback_manager=CallbackManager([counter])
        )

        async def consume():
            r = await streamed.aquery(QUESTION)
            return "".join([d async for d in r.async_response_gen()])

        asyncio.run(consume())
    info = response.metadata["aligner"]
    (first, second) = counter.llm_token_counts
    assert (first.prompt_token_count, first.completion_token_count) == (
        info["prompt_tokens"],
        info["completion_tokens"],
    )
    assert (
        second.completion_token_count == info["completion_tokens"]
    )  # greedy: the stream writes the same text
    ends = events.of("LLMCompletionEndEvent")
    assert len(ends) == 2 and ends[0].response.text == info["text"] and ANSWER in ends[0].prompt


def test_failed_generation_closes_its_llm_event(tiny_aligner):
    from tests.fixtures.llamaindex_helpers import OVERLONG

    seen = []

    class Ends(TokenCountingHandler):
        def on_event_end(self, event_type, payload=None, event_id="", **kwargs):
            seen.append((event_type, set(payload or {})))

    engine = AlignedQueryEngine(
        FixedAnswerEngine(answer=OVERLONG),
        tiny_aligner,
        on_error="passthrough",
        callback_manager=CallbackManager([Ends(tokenizer=str.split)]),
    )
    assert engine.query(QUESTION).metadata["aligner"]["error_type"] == "ContextOverflowError"
    assert [(t, {str(k.value) for k in keys}) for t, keys in seen if t == CBEventType.LLM] == [
        (CBEventType.LLM, {"exception"})
    ]


def test_aligned_llm_round_trips_through_a_dict(tiny_aligner):
    from llama_index.core.llms.mock import MockFunctionCallingLLM, MockLLM

    from llamaindex_aligner import AlignedLLM
    from tests.fixtures.llamaindex_helpers import ScriptedLLM

    llm = AlignedLLM(
        llm=MockLLM(max_tokens=5),
        aligner=tiny_aligner,
        generation_kwargs={"max_new_tokens": 3},
        correct_structured=True,
        on_error="passthrough",
    )
    data = llm.to_dict()
    assert data["llm"]["class_name"] == "MockLLM" and data["aligner"]["template"] == "aligner-v1"
    again = AlignedLLM.from_dict(
        data, aligner=tiny_aligner
    )  # the wrapped LLM rebuilt by LlamaIndex's load_llm
    assert again.to_dict() == data and isinstance(again.llm, MockLLM) and again.aligner is tiny_aligner
    assert AlignedLLM.from_json(llm.to_json(), aligner=tiny_aligner).to_dict() == data
    tools = AlignedLLM(llm=MockFunctionCallingLLM(), aligner=tiny_aligner)  # found by its class_name
    assert isinstance(AlignedLLM.from_dict(tools.to_dict(), aligner=tiny_aligner).llm, MockFunctionCallingLLM)
    scripted = AlignedLLM(llm=ScriptedLLM(), aligner=tiny_aligner).to_dict()
    with pytest.raises(ValueError, match="llm=llm"):  # 'custom_llm' names more than one class: pass it back
        AlignedLLM.from_dict(scripted, aligner=tiny_aligner)
    assert AlignedLLM.from_dict(scripted, aligner=tiny_aligner, llm=ScriptedLLM()).to_dict() == scripted
    with pytest.raises(
        ValueError, match="aligner=aligner"
    ):  # an Aligner built from objects has no id to reload
        AlignedLLM.from_dict(data)
