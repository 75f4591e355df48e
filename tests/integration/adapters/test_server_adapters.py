"""The framework adapters and the other commands, unchanged, on an Aligner that lives on a real vLLM server.

The upstream model answering the questions runs locally (SmolLM2 through ChatTransformers); the
corrector is the vLLM server: exactly the shape of an app server without a GPU.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from aligner_core import Aligner

pytestmark = [pytest.mark.integration, pytest.mark.vllm_server]
pytest.importorskip("httpx")

TOKENS = 16
QUESTIONS = ["What is the capital of Australia?", "How many legs does a spider have?"]
ANSWERS = ["The capital of Australia is Sydney.", "Spiders have six legs."]


@pytest.fixture(scope="module")
def served(vllm_server):
    aligner = Aligner.from_server(vllm_server.url, max_new_tokens=TOKENS)
    yield aligner
    aligner.close()


@pytest.fixture(scope="module")
def expected(served):
    return [c.text for c in served.correct_batch(list(zip(QUESTIONS, ANSWERS)))]


def test_langchain_runnable_and_chat_model_on_the_server(served, expected, smollm2):
    pytest.importorskip("langchain_core")
    from langchain_core.messages import AIMessage
    from langchain_core.prompts import ChatPromptTemplate

    from langchain_aligner import AlignedChatModel, AlignerRunnable, ChatTransformers, with_aligner

    stage = AlignerRunnable(aligner=served)
    assert stage.batch([{"question": q, "answer": a} for q, a in zip(QUESTIONS, ANSWERS)]) == expected
    assert asyncio.run(stage.ainvoke({"question": QUESTIONS[0], "answer": ANSWERS[0]})) == expected[0]
    assert "".join(stage.stream({"question": QUESTIONS[1], "answer": ANSWERS[1]})) == expected[1]

    llm = ChatTransformers.from_aligner(smollm2, max_tokens=TOKENS)
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    message = with_aligner(prompt | llm, aligner=served).invoke({"question": QUESTIONS[0]})
    assert isinstance(message, AIMessage) and message.content
    assert message.response_metadata["aligner"]["metadata"]["engine"] == "server"

    chat = AlignedChatModel(llm=llm, aligner=served, include_original=True)
    reply = chat.invoke(QUESTIONS[0])
    original = reply.response_metadata["aligner"]["original"]
    assert reply.content == served.correct(QUESTIONS[0], original).text

    async def collect():
        return [c.content async for c in chat.astream(QUESTIONS[0])]

    assert "".join(asyncio.run(collect())) == reply.content


def test_aligned_chat_model_builds_its_aligner_from_base_url(vllm_server, served, expected):
    """LangChain's standard parameters name an Aligner on a server: base_url, model, api_key, timeout, max_retries."""
    pytest.importorskip("langchain_core")
    from langchain_core.language_models import FakeListChatModel

    from langchain_aligner import AlignedChatModel

    chat = AlignedChatModel(
        llm=FakeListChatModel(responses=[ANSWERS[0]]),
        base_url=vllm_server.url,
        model=served.name,
        api_key="unused-locally",
        timeout=30,
        max_retries=1,
        max_tokens=TOKENS,
    )
    try:
        engine = chat.aligner.engine
        assert engine.name == "server" and engine.timeout == 30 and engine.max_retries == 1
        reply = chat.invoke(QUESTIONS[0])
        assert (
            reply.content == expected[0]
            and reply.response_metadata["aligner"]["metadata"]["engine"] == "server"
        )
    finally:
        chat.aligner.close()


def test_llamaindex_postprocessor_and_query_engine_on_the_server(served, expected):
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import NodeWithScore, TextNode

    from llamaindex_aligner import AlignedQueryEngine, AlignerNodePostprocessor
    from tests.fixtures.llamaindex_helpers import FixedAnswerEngine

    nodes = [NodeWithScore(node=TextNode(text=a), score=1.0) for a in ANSWERS]
    out = AlignerNodePostprocessor(aligner=served).postprocess_nodes(nodes, query_str=QUESTIONS[0])
    neighbours = [[b for b in ANSWERS if b != a] for a in ANSWERS]  # each node is read beside the other nodes
    want = [
        c.text
        for c in served.correct_batch(
            [{"question": QUESTIONS[0], "answer": a, "context": n} for a, n in zip(ANSWERS, neighbours)]
        )
    ]
    assert [n.node.get_content() for n in out] == want

    engine = AlignedQueryEngine(FixedAnswerEngine(answer=ANSWERS[0]), served)
    assert engine.query(QUESTIONS[0]).response == expected[0]
    assert asyncio.run(engine.aquery(QUESTIONS[0])).response == expected[0]


def test_aligner_eval_and_pairs_generate_with_server(vllm_server, served, tmp_path):
    from aligner_core.cli import main
    from aligner_core.loading import DEFAULT_MODEL

    records = tmp_path / "records.jsonl"
    records.write_text(
        "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(QUESTIONS, ANSWERS))
    )
    report = tmp_path / "report"
    code = main(
        [
            "eval",
            str(records),
            "-o",
            str(report),
            "--judge",
            DEFAULT_MODEL,
            "--judge-max-tokens",
            "4",
            "--one-order",
            "--retries",
            "0",
            "--dimensions",
            "helpfulness",
            "--no-plots",
            "--no-progress",
            "--server",
            vllm_server.url,
            "--max-new-tokens",
            str(TOKENS),
            "--bootstrap",
            "50",
        ]
    )
    assert code in (
        0,
        1,
    )  # 1 = some judge replies unreadable (a 135M judge); the corrections are the point here
    rows = [json.loads(line) for line in (report / "verdicts.jsonl").read_text().splitlines()]
    expected = [c.text for c in served.correct_batch(list(zip(QUESTIONS, ANSWERS)))]
    assert [r["correction"] for r in rows] == expected  # corrected on the server for records that had none

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(QUESTIONS) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    code = main(
        [
            "pairs",
            "--generate",
            "--upstream",
            DEFAULT_MODEL,
            "--prompts",
            str(prompts),
            "-o",
            str(pairs),
            "--upstream-max-new-tokens",
            "12",
            "--max-new-tokens",
            str(TOKENS),
            "--max-similarity",
            "1.0",
            "--no-progress",
            "--server",
            vllm_server.url,
        ]
    )
    assert code == 0
    done = [json.loads(line) for line in (tmp_path / "pairs.records.jsonl").read_text().splitlines()]
    assert [r["question"] for r in done] == QUESTIONS
    for r in done:
        assert r["correction"] == served.correct(r["question"], r["answer"]).text
