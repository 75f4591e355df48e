"""The Aligner sees what an answer was grounded on: retrieved nodes (query and chat engines, an AlignedLLM's
synthesizer), the postprocessor's neighbours, and the system prompt; checked on the prompt the Aligner renders."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import SummaryIndex  # noqa: E402
from llama_index.core.chat_engine import SimpleChatEngine  # noqa: E402

from llamaindex_aligner import AlignedChatEngine, AlignedLLM, AlignedQueryEngine, AlignerNodePostprocessor  # noqa: E402
from tests.fixtures.llamaindex_helpers import (  # noqa: E402
    QUESTION,
    FixedAnswerEngine,
    PromptSpy,
    ScriptedLLM,
    recording,
    roomy,
    text_nodes,
)

TEXTS = [n.node.get_content() for n in text_nodes()]


@pytest.fixture
def roomy_aligner(tiny_tokenizer):
    return roomy(tiny_tokenizer)


def test_wrapping_engines_ground_the_answer_on_their_source_nodes(tiny_aligner, monkeypatch):
    spy = PromptSpy(tiny_aligner, monkeypatch)
    with recording() as (events, _):
        response = AlignedQueryEngine(FixedAnswerEngine(nodes=text_nodes()), tiny_aligner).query(QUESTION)
    assert all(text in spy.prompts[0] for text in TEXTS)
    (start,) = [
        e for e in events.of("LLMCompletionStartEvent") if e.model_dict.get("class_name") == "Aligner"
    ]
    assert start.prompt == spy.prompts[0]  # the prompt reported to observability is the one generated from
    meta = response.metadata["aligner"]["metadata"]
    assert meta["context_items"] == 3 and meta["context_tokens"] > 0

    chat = AlignedChatEngine(
        SummaryIndex([n.node for n in text_nodes()]).as_chat_engine(chat_mode="context", llm=ScriptedLLM()),
        tiny_aligner,
    )
    assert chat.chat(QUESTION).metadata["aligner"]["metadata"]["context_items"] == 3
    assert all(text in spy.prompts[1] for text in TEXTS)
    plain = AlignedChatEngine(SimpleChatEngine.from_defaults(llm=ScriptedLLM()), tiny_aligner).chat(QUESTION)
    assert "context_items" not in plain.metadata["aligner"]["metadata"]  # nothing retrieved, nothing added


def test_postprocessor_reads_each_node_beside_its_neighbours(tiny_aligner, monkeypatch):
    spy = PromptSpy(tiny_aligner, monkeypatch)
    AlignerNodePostprocessor(aligner=tiny_aligner).postprocess_nodes(text_nodes(), query_str=QUESTION)
    assert len(spy.prompts) == 3
    for i, prompt in enumerate(spy.prompts):
        assert all(f"Document: {text}" in prompt for j, text in enumerate(TEXTS) if j != i)
        assert f"Document: {TEXTS[i]}" not in prompt  # its own text is the answer, not its context


def test_aligned_llm_sees_the_synthesizers_context_once_and_the_system_prompt(roomy_aligner, monkeypatch):
    spy = PromptSpy(roomy_aligner, monkeypatch)
    llm = AlignedLLM(llm=ScriptedLLM(chat_model=True), aligner=roomy_aligner)
    index = SummaryIndex([text_nodes()[2].node])
    index.as_query_engine(llm=llm).query(QUESTION)
    (prompt,) = spy.prompts
    assert (
        prompt.count(TEXTS[2]) == 1 and f"Document: {TEXTS[2]}" in prompt
    )  # as context, not in the history too
    assert f"Question: {QUESTION} |" in prompt  # the question is the query, not the rendered QA prompt
    engine = index.as_chat_engine(chat_mode="context", llm=llm, system_prompt="Answer in one sentence.")
    response = engine.chat(QUESTION)
    assert "Answer in one sentence." in spy.prompts[-1] and spy.prompts[-1].count(TEXTS[2]) == 1
    assert response.sources and len(spy.prompts) == 2
