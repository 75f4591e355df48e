"""AlignerRunnable and with_aligner on the tiny model, with langchain-core's fake chat models as the upstream."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.language_models import FakeListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompt_values import ChatPromptValue
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_core.tracers.run_collector import RunCollectorCallbackHandler

from aligner_core import Aligner, ContextOverflowError, GenerationOptionError, UnsafeStreamError
from langchain_aligner import (
    EVENT,
    AlignerRunnable,
    MissingQuestionError,
    UnsupportedInputError,
    with_aligner,
)
from tests.fixtures.langchain_helpers import ANSWER, QUESTION, EventRecorder, names, tree

PAIRS = [
    ("What is the capital of France?", "The capital of France is Berlin."),
    (QUESTION, ANSWER),
    ("Is it safe to mix bleach and ammonia?", "Yes, it cleans faster."),
]
PROMPT = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")])


@pytest.fixture(scope="module")
def aligner(tiny_model, tiny_tokenizer):
    a = Aligner.from_model(tiny_model, tiny_tokenizer, template="aligner-v1", name="tiny", max_new_tokens=10)
    yield a
    a.close()


def fake_llm(answers):
    return FakeListChatModel(responses=list(answers))


def reference(aligner, pairs):
    return [aligner.correct(q, a).text for q, a in pairs]


# -- the three chain forms ------------------------------------------------------------------------


def test_form1_assign_then_stage_corrects_str(aligner):
    chain = RunnablePassthrough.assign(
        answer=PROMPT | fake_llm([ANSWER]) | StrOutputParser()
    ) | AlignerRunnable(aligner=aligner)
    out = chain.invoke({"question": QUESTION})
    assert isinstance(out, str)
    assert out == reference(aligner, [(QUESTION, ANSWER)])[0]


def test_form1_with_custom_keys(aligner):
    stage = AlignerRunnable(aligner=aligner, question_key="q", answer_key="draft")
    assert stage.invoke({"q": QUESTION, "draft": ANSWER}) == reference(aligner, [(QUESTION, ANSWER)])[0]
    with pytest.raises(UnsupportedInputError, match="'draft'"):
        stage.invoke({"q": QUESTION, "answer": ANSWER})


SYSTEM = {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize(
    ("value", "history"),
    [
        (QUESTION, None),
        ({"question": QUESTION, "style": "short"}, None),
        (
            {"question": [("system", "Be brief."), ("human", "hi"), ("ai", "Hello!"), ("human", QUESTION)]},
            [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}],
        ),
        (ChatPromptValue(messages=[SystemMessage("Be brief."), HumanMessage(QUESTION)]), [SYSTEM]),
        ([SystemMessage("Be brief."), HumanMessage(QUESTION)], [SYSTEM]),
    ],
    ids=["str", "dict", "dict-of-messages", "prompt-value", "message-list"],
)
def test_form2_with_aligner_finds_the_question_in_the_input(aligner, value, history):
    upstream = GenericFakeChatModel(messages=iter([AIMessage(ANSWER, id="up-1")]))
    chain = with_aligner(
        RunnableLambda(lambda _: "any prompt") | upstream, aligner=aligner, include_original=True
    )
    out = chain.invoke(value)
    assert isinstance(out, AIMessage)
    assert (
        out.content == aligner.correct(QUESTION, ANSWER, history=history).text
    )  # earlier messages: the history
    assert out.response_metadata["aligner"]["metadata"].get("history_turns") == (
        len(history) if history else None
    )
    assert out.response_metadata["aligner"]["original"] == ANSWER and out.id == "up-1"


def test_form2_missing_question_key_says_so(aligner):
    chain = with_aligner(PROMPT | fake_llm([ANSWER]), aligner=aligner, question_key="query")
    with pytest.raises(MissingQuestionError, match="'query'"):
        chain.invoke({"question": QUESTION})


def test_form3_fixed_question_and_configurable_override(aligner):
    chain = (
        PROMPT
        | fake_llm([ANSWER, ANSWER])
        | StrOutputParser()
        | AlignerRunnable(aligner=aligner, question="Q?")
    )
    fixed = chain.invoke({"question": "ignored by the stage"})
    configured = chain.invoke({"question": "x"}, config={"configurable": {"question": QUESTION}})
    assert fixed == aligner.correct("Q?", ANSWER).text
    assert configured == reference(aligner, [(QUESTION, ANSWER)])[0]


def test_form3_without_any_question_explains_the_options(aligner):
    chain = PROMPT | fake_llm([ANSWER]) | AlignerRunnable(aligner=aligner)
    with pytest.raises(MissingQuestionError, match="configurable"):
        chain.invoke({"question": QUESTION})


def test_unsupported_answer_type(aligner):
    with pytest.raises(UnsupportedInputError, match="str, an AIMessage or a structured result"):
        AlignerRunnable(aligner=aligner, question="Q?").invoke(42)


def test_misspelled_field_fails_loudly(aligner):
    with pytest.raises(ValueError, match="question_kye"):
        AlignerRunnable(aligner=aligner, question_kye="q")


# -- output types and metadata --------------------------------------------------------------------


def test_aimessage_keeps_id_usage_and_metadata(aligner):
    answer = AIMessage(
        ANSWER,
        id="run-42",
        usage_metadata={"input_tokens": 5, "output_tokens": 7, "total_tokens": 12},
        response_metadata={"model_name": "upstream-x", "finish_reason": "stop"},
    )
    out = AlignerRunnable(aligner=aligner, question=QUESTION, include_original=True).invoke(answer)
    assert isinstance(out, AIMessage) and out is not answer
    assert out.content == reference(aligner, [(QUESTION, ANSWER)])[0]
    assert out.id == "run-42"
    assert out.usage_metadata == answer.usage_metadata
    assert out.response_metadata["model_name"] == "upstream-x"
    meta = out.response_metadata["aligner"]
    assert meta["original"] == ANSWER and meta["model"] == "tiny" and "skipped" not in meta
    assert meta["changed"] == (out.content != ANSWER)
    assert 0.0 <= meta["similarity"] <= 1.0 and meta["latency_s"] > 0
    assert answer.content == ANSWER and "aligner" not in answer.response_metadata  # input untouched


def test_list_content_keeps_non_text_blocks(aligner):
    answer = AIMessage([{"type": "reasoning", "reasoning": "think"}, {"type": "text", "text": ANSWER}])
    out = AlignerRunnable(aligner=aligner, question=QUESTION).invoke(answer)
    assert out.content[0] == {"type": "reasoning", "reasoning": "think"}
    assert out.text == reference(aligner, [(QUESTION, ANSWER)])[0]
    chunks = list(AlignerRunnable(aligner=aligner, question=QUESTION).stream(answer))
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.text == out.text and {"type": "reasoning", "reasoning": "think"} in full.content


TOOL_CALLS = [{"name": "lookup", "args": {}, "id": "c1", "type": "tool_call"}]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (AIMessage("", tool_calls=TOOL_CALLS), "tool_calls"),
        (AIMessage(ANSWER, tool_calls=TOOL_CALLS), "tool_calls"),
        (AIMessage("", additional_kwargs={"refusal": "I can't."}), "refusal"),
        ("", "empty_answer"),
        ("   ", "empty_answer"),
        (AIMessage([{"type": "image_url", "image_url": {"url": "data:,"}}]), "non_text_content"),
    ],
    ids=["tool-calls-only", "text-and-tool-calls", "refusal", "empty", "blank", "image-only"],
)
def test_answers_the_core_passes_through_come_back_unchanged_with_the_reason(aligner, answer, reason):
    events = EventRecorder()
    stage = AlignerRunnable(aligner=aligner, question=QUESTION)
    out = stage.invoke(answer, config={"callbacks": [events]})
    batched = stage.batch([answer, ANSWER])[0]
    streamed = list(stage.stream(answer))
    assert len(streamed) == 1
    assert [e[1]["skipped"] for e in events.events] == [reason]
    if isinstance(answer, str):
        assert out is answer and batched is answer and streamed == [answer]
        return
    for got in (out, batched, streamed[0]):
        assert got.content == answer.content and got.tool_calls == answer.tool_calls
        meta = got.response_metadata["aligner"]
        assert meta["skipped"] == reason and meta["completion_tokens"] == 0 and not meta["changed"]


def test_content_the_aligner_cannot_read_is_an_error_not_a_passthrough(aligner):
    from aligner_core import UnreadableContentError

    stage = AlignerRunnable(aligner=aligner, question=QUESTION, on_error="passthrough")
    for answer in (AIMessage([{"type": "mystery", "payload": 1}]), AIMessage([{"type": "text", "text": 3}])):
        with pytest.raises(UnreadableContentError, match="cannot read"):
            stage.invoke(answer)
        with pytest.raises(UnreadableContentError):
            list(stage.stream(answer))


def test_text_parts_are_corrected_as_their_text(aligner):
    answer = AIMessage([{"type": "text", "text": "Spiders have "}, {"type": "text", "text": "six legs."}])
    out = AlignerRunnable(aligner=aligner, question=QUESTION, include_original=True).invoke(answer)
    assert out.text == reference(aligner, [(QUESTION, "Spiders have six legs.")])[0]
    assert out.response_metadata["aligner"]["original"] == "Spiders have six legs."


def test_generation_kwargs_and_call_kwargs(aligner):
    stage = AlignerRunnable(aligner=aligner, question=QUESTION, generation_kwargs={"max_new_tokens": 3})
    out = stage.invoke(AIMessage(ANSWER))
    assert out.response_metadata["aligner"]["completion_tokens"] <= 3
    out = stage.bind(max_new_tokens=5).invoke(AIMessage(ANSWER))
    assert out.response_metadata["aligner"]["completion_tokens"] <= 5


def test_empty_correction_keeps_the_original(aligner):
    first = aligner.correct(QUESTION, ANSWER).text
    assert first.strip()
    stage = AlignerRunnable(aligner=aligner, question=QUESTION, generation_kwargs={"stop": [first[:2]]})
    assert aligner.correct(QUESTION, ANSWER, stop=[first[:2]]).text == ""  # the stop string cuts at once
    out = stage.invoke(AIMessage(ANSWER))
    meta = out.response_metadata["aligner"]
    assert out.content == ANSWER and meta["empty_correction"] and meta["changed"] is False
    assert stage.invoke(ANSWER) == ANSWER and list(stage.stream(ANSWER)) == [ANSWER]


# -- failure policy ---------------------------------------------------------------------------------

TOO_LONG = "word " * 600  # more tokens than the tiny model's 512-token context


def test_raise_policy_raises_the_core_error(aligner):
    with pytest.raises(ContextOverflowError):
        AlignerRunnable(aligner=aligner, question=QUESTION).invoke(TOO_LONG)


def test_passthrough_returns_original_with_error_recorded(aligner):
    stage = AlignerRunnable(aligner=aligner, question=QUESTION, on_error="passthrough")
    recorder = EventRecorder()
    assert stage.invoke(TOO_LONG, config={"callbacks": [recorder]}) == TOO_LONG
    ((name, data, _),) = recorder.events
    assert name == EVENT and data["error_type"] == "ContextOverflowError" and data["changed"] is False
    out = stage.invoke(AIMessage(TOO_LONG, id="m1"))
    assert out.content == TOO_LONG and out.id == "m1"
    assert out.response_metadata["aligner"]["error_type"] == "ContextOverflowError"
    assert "context" in out.response_metadata["aligner"]["error"]


def test_passthrough_in_a_batch_only_affects_the_failing_item(aligner):
    stage = AlignerRunnable(aligner=aligner, question=QUESTION, on_error="passthrough")
    out = stage.batch([ANSWER, TOO_LONG, "Six."])
    assert out == [aligner.correct(QUESTION, ANSWER).text, TOO_LONG, aligner.correct(QUESTION, "Six.").text]


def test_raise_policy_in_a_batch_with_return_exceptions(aligner):
    stage = AlignerRunnable(aligner=aligner, question=QUESTION)
    out = stage.batch([ANSWER, TOO_LONG, 42], return_exceptions=True)
    assert out[0] == aligner.correct(QUESTION, ANSWER).text
    assert isinstance(out[1], ContextOverflowError) and isinstance(out[2], UnsupportedInputError)
    with pytest.raises(UnsupportedInputError):
        stage.batch([ANSWER, 42])


def test_misspelled_generation_option_raises_even_with_passthrough(aligner):
    stage = AlignerRunnable(aligner=aligner, question=QUESTION, on_error="passthrough")
    with pytest.raises(GenerationOptionError, match="max_new_token"):
        stage.invoke(ANSWER, max_new_token=4)
    with pytest.raises(GenerationOptionError):
        stage.batch([ANSWER], max_new_token=4)


def test_passthrough_when_streaming(aligner):
    stage = AlignerRunnable(aligner=aligner, question=QUESTION, on_error="passthrough")
    assert list(stage.stream(TOO_LONG)) == [TOO_LONG]
    (chunk,) = list(stage.stream(AIMessage(TOO_LONG)))
    assert (
        chunk.content == TOO_LONG
        and chunk.response_metadata["aligner"]["error_type"] == "ContextOverflowError"
    )


# -- batch, async, streaming ------------------------------------------------------------------------


def spy(monkeypatch, aligner, name):
    calls = []
    original = getattr(aligner, name)

    def record(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(aligner, name, record)
    return calls


def test_batch_is_one_correct_batch_pass_and_keeps_order(aligner, monkeypatch):
    expected = reference(aligner, PAIRS)
    batches, singles = spy(monkeypatch, aligner, "correct_batch"), spy(monkeypatch, aligner, "correct")
    answers = dict(PAIRS)
    chain = RunnablePassthrough.assign(
        answer=RunnableLambda(lambda x: answers[x["question"]])
    ) | AlignerRunnable(aligner=aligner)
    out = chain.batch([{"question": q} for q, _ in PAIRS])
    assert out == expected
    assert len(batches) == 1 and len(batches[0][0]) == len(PAIRS) and singles == []


def test_batch_respects_max_concurrency(aligner, monkeypatch):
    expected = reference(aligner, PAIRS)
    batches = spy(monkeypatch, aligner, "correct_batch")
    stage = AlignerRunnable(aligner=aligner)
    out = stage.batch([{"question": q, "answer": a} for q, a in PAIRS], config={"max_concurrency": 2})
    assert out == expected
    assert [len(args[0]) for args in batches] == [2, 1]


def test_abatch_shares_batches_and_respects_max_concurrency(aligner, monkeypatch):
    expected = reference(aligner, PAIRS)
    original = aligner.acorrect
    live, peak, calls = [0], [0], []

    async def counted(*args, **kwargs):
        calls.append(args)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        try:
            return await original(*args, **kwargs)
        finally:
            live[0] -= 1

    monkeypatch.setattr(aligner, "acorrect", counted)
    stage = AlignerRunnable(aligner=aligner)
    inputs = [{"question": q, "answer": a} for q, a in PAIRS]
    assert asyncio.run(stage.abatch(inputs)) == expected and len(calls) == 3 and peak[0] == 3
    peak[0] = 0
    assert asyncio.run(stage.abatch(inputs, config={"max_concurrency": 1})) == expected and peak[0] == 1


def test_ainvoke_and_concurrent_calls(aligner):
    stage = AlignerRunnable(aligner=aligner)

    async def main():
        return await asyncio.gather(*(stage.ainvoke({"question": q, "answer": a}) for q, a in PAIRS))

    assert asyncio.run(main()) == reference(aligner, PAIRS)


def test_stream_inside_a_sequence_gathers_then_streams_deltas(aligner):
    upstream = GenericFakeChatModel(messages=iter([ANSWER, ANSWER]))  # streams word by word
    chain = PROMPT | upstream | StrOutputParser() | AlignerRunnable(aligner=aligner, question=QUESTION)
    deltas = list(chain.stream({"question": QUESTION}))
    assert len(deltas) > 1 and all(isinstance(d, str) for d in deltas)
    assert (
        "".join(deltas) == chain.invoke({"question": QUESTION}) == reference(aligner, [(QUESTION, ANSWER)])[0]
    )


def test_form1_streams_and_astream_events_carry_the_details(aligner):
    def chain(**options):
        upstream = GenericFakeChatModel(messages=iter([ANSWER]))
        stage = AlignerRunnable(aligner=aligner, **options)
        return RunnablePassthrough.assign(answer=PROMPT | upstream | StrOutputParser()) | stage

    deltas = list(
        chain().stream({"question": QUESTION})
    )  # the chain's own output stream: corrected text only
    assert len(deltas) > 1 and "".join(deltas) == reference(aligner, [(QUESTION, ANSWER)])[0]

    async def events(**options):
        return [e async for e in chain(**options).astream_events({"question": QUESTION}, version="v2")]

    seen = asyncio.run(events(stream_uncorrected=True))  # opted in: the upstream's tokens do stream here
    custom = [e for e in seen if e["event"] == "on_custom_event"]
    assert [e["name"] for e in custom] == [EVENT] and "original" not in custom[0]["data"]
    assert custom[0]["data"]["changed"] is True
    assert any(e["event"] == "on_chain_stream" and e["name"] == "AlignerRunnable" for e in seen)
    assert any(e["event"] == "on_chat_model_stream" and e["name"] == "GenericFakeChatModel" for e in seen)


def test_a_bare_stage_after_a_model_refuses_to_stream_under_astream_events(aligner):
    """``prompt | llm | AlignerRunnable()`` cannot hide the model's tokens: it refuses before the model runs."""
    upstream = GenericFakeChatModel(messages=iter([ANSWER, ANSWER]))
    chain = PROMPT | upstream | AlignerRunnable(aligner=aligner, question=QUESTION)
    seen: list[dict] = []

    async def events() -> None:
        async for event in chain.astream_events({"question": QUESTION}, version="v2"):
            seen.append(event)

    with pytest.raises(UnsafeStreamError, match=r"with_aligner\(prompt \| llm, aligner=aligner\)"):
        asyncio.run(events())
    assert not [e for e in seen if "chat_model" in e["event"]]  # the model never started: nothing leaked
    assert len(list(upstream.messages)) == 2  # no answer was drawn
    upstream.messages = iter([ANSWER])
    assert chain.invoke({"question": QUESTION}).content  # no stream surface: runs as before


def test_message_stream_adds_up_to_invoke(aligner):
    answer = AIMessage(
        ANSWER, id="m7", usage_metadata={"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}
    )
    stage = AlignerRunnable(aligner=aligner, question=QUESTION, include_original=True)
    chunks = list(stage.stream(answer))
    assert len(chunks) > 2 and chunks[-1].chunk_position == "last"
    assert sum(1 for c in chunks if c.usage_metadata) == 1
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    whole = stage.invoke(answer)
    assert full.content == whole.content and full.id == "m7"
    assert full.usage_metadata == answer.usage_metadata
    assert full.response_metadata["aligner"]["original"] == ANSWER


def test_astream_inside_a_sequence(aligner):
    upstream = GenericFakeChatModel(messages=iter([AIMessage(ANSWER)]))
    chain = with_aligner(PROMPT | upstream, aligner=aligner, include_original=True)

    async def main():
        return [c async for c in chain.astream({"question": QUESTION})]

    chunks = asyncio.run(main())
    assert len(chunks) > 2
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.content == reference(aligner, [(QUESTION, ANSWER)])[0]
    assert full.response_metadata["aligner"]["original"] == ANSWER


# -- tracing ----------------------------------------------------------------------------------------


def test_each_call_is_a_chain_run_nested_under_the_chain(aligner):
    collector, recorder = RunCollectorCallbackHandler(), EventRecorder()
    chain = with_aligner(PROMPT | fake_llm([ANSWER]), aligner=aligner, include_original=True)
    chain.invoke({"question": QUESTION}, config={"callbacks": [collector, recorder], "tags": ["t1"]})
    (root,) = collector.traced_runs
    shape = tree(root)
    assert shape[0] == "with_aligner"
    assert shape[2][-1] == ("AlignerRunnable", "chain", [("Aligner", "llm", [])])
    assert {"FakeListChatModel", "ChatPromptTemplate"} <= set(names(shape))
    stage_run = next(r for r in root.child_runs if r.name == "AlignerRunnable")
    assert stage_run.parent_run_id == root.id and "t1" in stage_run.tags
    ((name, data, run_id),) = recorder.events
    assert name == EVENT and run_id == stage_run.id and data["original"] == ANSWER


def test_batch_makes_one_run_per_input(aligner):
    collector = RunCollectorCallbackHandler()
    stage = AlignerRunnable(aligner=aligner)
    stage.batch([{"question": q, "answer": a} for q, a in PAIRS], config={"callbacks": [collector]})
    assert [r.name for r in collector.traced_runs] == ["AlignerRunnable"] * len(PAIRS)
    assert [r.outputs["output"] for r in collector.traced_runs] == reference(aligner, PAIRS)
