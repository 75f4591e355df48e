"""Inspector gating through the LangChain and LlamaIndex adapters: answers that pass come back unchanged and cost no
generation, the others are corrected as before, and the verdict is reported where each framework looks."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.tracers.run_collector import RunCollectorCallbackHandler
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.chat_engine import SimpleChatEngine
from pydantic import ValidationError

from aligner_core import Aligner, InspectorError
from aligner_core.inspector import Inspector
from langchain_aligner import AlignedChatModel, AlignerRunnable, with_aligner
from llamaindex_aligner import ORIGINAL_TEXT_KEY, AlignedChatEngine, AlignedLLM, AlignerNodePostprocessor
from tests.fixtures.langchain_helpers import ANSWER, QUESTION
from tests.fixtures.llamaindex_helpers import ANSWER as SYDNEY
from tests.fixtures.llamaindex_helpers import QUESTION as CAPITAL
from tests.fixtures.llamaindex_helpers import ScriptedLLM, recording, text_nodes


@pytest.fixture(scope="module")
def aligner(tiny_model, tiny_tokenizer):
    a = Aligner.from_model(tiny_model, tiny_tokenizer, template="aligner-v1", name="tiny", max_new_tokens=8)
    yield a
    a.close()


def passes(question: str, answer: str) -> float:
    return 1.0


def fails(question: str, answer: str) -> float:
    return 0.0


def corrected(aligner: Aligner, answer: str = ANSWER, question: str = QUESTION) -> str:
    fix = aligner.correct(question, answer)
    return fix.text if fix.text.strip() else answer


# -- LangChain ------------------------------------------------------------------------------------


def test_runnable_passed_answer_costs_no_generation(aligner):
    stage = AlignerRunnable(aligner=aligner, question=QUESTION, inspector=passes, threshold=0.9)
    assert stage.invoke(ANSWER) == ANSWER
    collector = RunCollectorCallbackHandler()
    out = stage.invoke(AIMessage(ANSWER, id="up-1"), config={"callbacks": [collector]})
    info = out.response_metadata["aligner"]
    assert out.content == ANSWER and out.id == "up-1"
    assert info["completion_tokens"] == 0 and info["changed"] is False
    assert (info["inspector_score"], info["inspector_threshold"], info["inspector_passed"]) == (
        1.0,
        0.9,
        True,
    )
    (traced,) = collector.traced_runs[0].child_runs  # the Aligner run reports the verdict in its output
    message = traced.outputs["generations"][0][0]["message"]["kwargs"]
    assert message["response_metadata"]["aligner"]["inspector_passed"] is True
    assert message["usage_metadata"]["output_tokens"] == 0
    assert "".join(stage.stream(ANSWER)) == ANSWER  # a passed answer streams as itself


def test_runnable_failed_answer_is_corrected_as_before(aligner):
    stage = AlignerRunnable(aligner=aligner, question=QUESTION, inspector=fails)
    out = stage.invoke(AIMessage(ANSWER))
    info = out.response_metadata["aligner"]
    assert out.content == corrected(aligner)
    assert (
        info["completion_tokens"] > 0 and info["inspector_passed"] is False and info["inspector_score"] == 0.0
    )
    assert "".join(stage.stream(ANSWER)) == corrected(aligner)


def test_runnable_batch_gates_each_answer(aligner):
    good = "Spiders have eight legs."
    inspector = Inspector(lambda pairs: [1.0 if "eight" in a else 0.0 for _, a in pairs], batched=True)
    stage = AlignerRunnable(aligner=aligner, question=QUESTION, inspector=inspector)
    expected = [good, corrected(aligner)]
    assert stage.batch([good, ANSWER]) == expected
    assert asyncio.run(stage.abatch([good, ANSWER])) == expected


def test_chat_model_and_with_aligner_take_the_inspector(aligner):
    chat = AlignedChatModel(
        llm=GenericFakeChatModel(messages=iter([AIMessage(ANSWER)] * 3)), aligner=aligner, inspector=passes
    )
    reply = chat.invoke(QUESTION)
    assert reply.content == ANSWER and reply.response_metadata["aligner"]["inspector_passed"] is True
    assert "".join(c.text for c in chat.stream(QUESTION)) == ANSWER
    chain = with_aligner(RunnableLambda(lambda _: ANSWER), aligner=aligner, inspector=fails, threshold=0.2)
    assert chain.invoke({"question": QUESTION}) == corrected(aligner)
    assert (
        with_aligner(RunnableLambda(lambda _: ANSWER), aligner=aligner, inspector=passes).invoke(QUESTION)
        == ANSWER
    )


def test_langchain_settings_are_checked(aligner):
    with pytest.raises(ValidationError, match="threshold"):
        AlignerRunnable(aligner=aligner, inspector=passes, threshold=1.5)
    with pytest.raises(ValidationError):
        AlignerRunnable(aligner=aligner, inspector="not callable")


# -- LlamaIndex -----------------------------------------------------------------------------------


def test_aligned_llm_passed_answer_and_events(aligner):
    llm = AlignedLLM(llm=ScriptedLLM(chat_model=True), aligner=aligner, inspector=passes)
    messages = [ChatMessage(role="user", content=CAPITAL)]
    with recording() as (events, _):
        response = llm.chat(messages)
    info = response.additional_kwargs["aligner"]
    assert response.message.content == SYDNEY and info["completion_tokens"] == 0
    assert response.raw["usage"]["completion_tokens"] == 0
    assert info["inspector_passed"] is True and info["inspector_score"] == 1.0
    (end,) = events.of("AlignerEndEvent")
    assert (end.num_inspected, end.num_inspector_passed, end.inspector_scores) == (1, 1, [1.0])
    assert end.num_corrected == 0 and end.completion_tokens == 0  # served as it was
    chunks = list(llm.stream_chat(messages))
    assert (
        "".join(c.delta for c in chunks) == SYDNEY
        and chunks[-1].additional_kwargs["aligner"]["inspector_passed"]
    )


def test_chat_engine_failed_answer_is_corrected_with_the_verdict(aligner):
    engine = AlignedChatEngine(SimpleChatEngine.from_defaults(llm=ScriptedLLM()), aligner, inspector=fails)
    with recording() as (events, _):
        response = engine.chat(CAPITAL)
    info = response.metadata["aligner"]
    assert response.response == corrected(aligner, SYDNEY, CAPITAL)
    assert info["inspector_passed"] is False and info["completion_tokens"] > 0
    (end,) = [
        e for e in events.of("LLMCompletionEndEvent") if "inspector_passed" in e.response.additional_kwargs
    ]
    assert end.response.additional_kwargs["inspector_score"] == 0.0


def test_postprocessor_inspector_scores_and_reports(aligner):
    seen = []

    def score(question: str, text: str) -> float:
        seen.append(text)
        return 0.1 if "Sydney" in text else 0.8

    nodes = text_nodes()
    pp = AlignerNodePostprocessor(aligner=aligner, inspector=score, threshold=0.5)
    with recording() as (events, _):
        out = pp.postprocess_nodes(nodes, query_str=CAPITAL)
    assert seen == [n.node.get_content() for n in nodes]
    assert [ORIGINAL_TEXT_KEY in n.node.metadata for n in out] == [True, False, False]
    assert [n.node.metadata["aligner_inspector_passed"] for n in out] == [False, True, True]
    assert [n.node.metadata["aligner_inspector_score"] for n in out] == [0.1, 0.8, 0.8]
    assert [n.node.get_content() for n in out[1:]] == [n.node.get_content() for n in nodes[1:]]
    assert "aligner_inspector_score" in out[1].node.excluded_llm_metadata_keys
    (end,) = events.of("AlignerEndEvent")
    assert (end.num_inspected, end.num_inspector_passed, end.inspector_scores) == (3, 2, [0.1, 0.8, 0.8])
    assert end.num_corrected == 1
    assert "inspector" not in pp.to_dict() and pp.to_dict()["threshold"] == 0.5


def test_postprocessor_refuses_a_boolean_gate(aligner):
    def needs_fixing(question: str, text: str) -> bool:  # ambiguous: True meant "correct this node" once
        return "Sydney" in text

    with pytest.raises(InspectorError, match="score in"):  # the core says what to return instead
        AlignerNodePostprocessor(aligner=aligner, inspector=needs_fixing).postprocess_nodes(
            text_nodes(), query_str=CAPITAL
        )


def test_an_aligners_own_inspector_gates_adapter_calls(tiny_model, tiny_tokenizer):
    own = Aligner.from_model(
        tiny_model, tiny_tokenizer, template="aligner-v1", max_new_tokens=8, inspector=passes
    )
    try:
        out = AlignerRunnable(aligner=own, question=QUESTION).invoke(
            AIMessage(ANSWER)
        )  # nothing set on the stage
        assert out.content == ANSWER and out.response_metadata["aligner"]["inspector_passed"] is True
        stricter = AlignerRunnable(aligner=own, question=QUESTION, inspector=fails).invoke(AIMessage(ANSWER))
        assert stricter.response_metadata["aligner"]["inspector_passed"] is False  # the stage's own wins
        engine = AlignedChatEngine(SimpleChatEngine.from_defaults(llm=ScriptedLLM()), own)
        assert engine.chat(CAPITAL).metadata["aligner"]["inspector_passed"] is True
    finally:
        own.close()
