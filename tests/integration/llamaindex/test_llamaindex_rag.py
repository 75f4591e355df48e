"""A real RAG pipeline: VectorStoreIndex over MiniLM embeddings, SmolLM2 as the LLM and as the Aligner.

Queried through AlignerNodePostprocessor and AlignedQueryEngine, sync, async and streaming. Nothing is
mocked: the embedding model is the packaged all-MiniLM-L6-v2, the LLM and the corrector are the packaged
SmolLM2-135M-Instruct (one copy of the weights, shared).
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("sentence_transformers")

from llama_index.core import Document, VectorStoreIndex  # noqa: E402
from llama_index.core.base.response.schema import AsyncStreamingResponse, StreamingResponse  # noqa: E402
from llama_index.core.schema import MetadataMode  # noqa: E402

from llamaindex_aligner import (  # noqa: E402
    ORIGINAL_TEXT_KEY,
    AlignedChatEngine,
    AlignedLLM,
    AlignedQueryEngine,
    AlignerNodePostprocessor,
    SentenceTransformerEmbedding,
    huggingface_llm,
)
from tests.fixtures.llamaindex_helpers import recording  # noqa: E402

pytestmark = pytest.mark.integration

DOCS = [
    "Canberra is the capital city of Australia. Sydney is its largest city.",
    "Spiders are arachnids and have eight legs. Insects have six legs.",
    "To boil an egg, put it in boiling water for nine minutes, then cool it in cold water.",
    "Never mix bleach and ammonia: the fumes are toxic.",
]
QUESTION = "What is the capital of Australia?"
GEN = {"max_new_tokens": 12}


class Rag:
    def __init__(self, aligner):
        self.aligner = aligner
        self.embed = SentenceTransformerEmbedding()
        self.llm = huggingface_llm(aligner, max_new_tokens=12)
        self.index = VectorStoreIndex.from_documents([Document(text=t) for t in DOCS], embed_model=self.embed)

    def engine(self, **kwargs):
        return self.index.as_query_engine(llm=self.llm, similarity_top_k=2, **kwargs)

    def postprocessor(self, **kwargs):
        return AlignerNodePostprocessor(aligner=self.aligner, generation_kwargs=GEN, **kwargs)


@pytest.fixture(scope="module")
def rag(smollm2):
    return Rag(smollm2)


@pytest.fixture(scope="module")
def plain_answer(rag):
    return rag.engine().query(QUESTION).response


def test_minilm_embeddings_retrieve_the_right_document(rag):
    q = rag.embed.get_query_embedding(QUESTION)
    capital, egg = rag.embed.get_text_embedding_batch([DOCS[0], DOCS[2]])
    assert len(q) == 384
    assert sum(a * b for a, b in zip(q, capital)) > sum(a * b for a, b in zip(q, egg)) + 0.2
    top = rag.index.as_retriever(similarity_top_k=1).retrieve(QUESTION)
    assert top[0].node.get_content() == DOCS[0]


def check_corrected_sources(response, retrieved):
    assert [n.node.node_id for n in response.source_nodes] == [n.node.node_id for n in retrieved]
    assert [n.score for n in response.source_nodes] == pytest.approx([n.score for n in retrieved])
    for new, old in zip(response.source_nodes, retrieved):
        assert new.node.metadata[ORIGINAL_TEXT_KEY] == old.node.get_content()
        assert new.node.get_content().strip()
        assert ORIGINAL_TEXT_KEY not in new.node.get_content(metadata_mode=MetadataMode.LLM)


def test_postprocessor_corrects_the_retrieved_context(rag):
    retrieved = rag.index.as_retriever(similarity_top_k=2).retrieve(QUESTION)
    with recording() as (events, _):
        response = rag.engine(node_postprocessors=[rag.postprocessor()]).query(QUESTION)
    assert response.response.strip()
    check_corrected_sources(response, retrieved)
    (start,) = events.of("AlignerStartEvent")
    (end,) = events.of("AlignerEndEvent")
    assert (start.num_items, start.num_selected, end.num_errors) == (2, 2, 0)
    assert end.completion_tokens <= 2 * GEN["max_new_tokens"] and end.latency_s > 0
    aligner_calls = [
        e for e in events.of("LLMCompletionStartEvent") if e.model_dict.get("class_name") == "Aligner"
    ]
    assert len(aligner_calls) == 2  # one LLM event per corrected node, for token and cost views
    (llm_call,) = [e for e in events.of("LLMCompletionStartEvent") if e not in aligner_calls]
    assert all(n.node.get_content() in llm_call.prompt for n in response.source_nodes)
    assert not any(n.node.metadata[ORIGINAL_TEXT_KEY] in llm_call.prompt for n in response.source_nodes)


def test_postprocessor_async_with_top_n(rag):
    retrieved = rag.index.as_retriever(similarity_top_k=2).retrieve(QUESTION)
    engine = rag.engine(node_postprocessors=[rag.postprocessor(top_n=1)])
    response = asyncio.run(engine.aquery(QUESTION))
    assert response.response.strip()
    assert [ORIGINAL_TEXT_KEY in n.node.metadata for n in response.source_nodes] == [True, False]
    assert response.source_nodes[0].node.metadata[ORIGINAL_TEXT_KEY] == retrieved[0].node.get_content()
    assert response.source_nodes[1].node.get_content() == retrieved[1].node.get_content()


def test_aligned_engine_corrects_the_final_answer(rag, plain_answer):
    engine = rag.engine()
    with recording() as (events, _):
        response = AlignedQueryEngine(
            engine, rag.aligner, generation_kwargs=GEN, include_original=True
        ).query(QUESTION)
    info = response.metadata["aligner"]
    assert info["original"] == plain_answer  # greedy: the inner engine answers as it does alone
    assert response.response == info["text"] and response.response.strip()
    assert info["error"] is None and 0 < info["completion_tokens"] <= GEN["max_new_tokens"]
    assert [n.node.get_content() for n in response.source_nodes][:1] == [DOCS[0]]
    assert len(events.of("AlignerEndEvent")) == 1


def test_aligned_engine_async_over_the_postprocessor(rag):
    inner = rag.engine(node_postprocessors=[rag.postprocessor()])
    engine = AlignedQueryEngine(inner, rag.aligner, generation_kwargs=GEN, include_original=True)
    with recording() as (events, _):
        response = asyncio.run(engine.aquery(QUESTION))
    info = response.metadata["aligner"]
    assert response.response == info["text"] and info["error"] is None and info["original"].strip()
    assert all(ORIGINAL_TEXT_KEY in n.node.metadata for n in response.source_nodes)
    assert sorted(e.component for e in events.of("AlignerEndEvent")) == ["node_postprocessor", "query_engine"]


def test_aligned_engine_streams_the_correction(rag, plain_answer):
    engine = AlignedQueryEngine(
        rag.engine(), rag.aligner, generation_kwargs=GEN, streaming=True, include_original=True
    )
    response = engine.query(QUESTION)
    assert isinstance(response, StreamingResponse)
    text = "".join(response.response_gen)
    info = response.metadata["aligner"]
    assert text == info["text"] and text.strip()
    assert info["original"].strip() == plain_answer.strip()
    assert len(response.source_nodes) == 2


def test_aligned_engine_streams_async(rag):
    engine = AlignedQueryEngine(
        rag.engine(),
        rag.aligner,
        generation_kwargs=GEN,
        on_error="passthrough",
        streaming=True,
        include_original=True,
    )

    async def main():
        response = await engine.aquery(QUESTION)
        assert isinstance(response, AsyncStreamingResponse)
        return response, [d async for d in response.async_response_gen()]

    response, deltas = asyncio.run(main())
    info = response.metadata["aligner"]
    assert "".join(deltas) == info["text"] and info["error"] is None and info["original"].strip()


def test_chat_engine_streams_the_corrected_answer(rag):
    inner = rag.index.as_chat_engine(chat_mode="context", llm=rag.llm, similarity_top_k=1)
    engine = AlignedChatEngine(inner, rag.aligner, generation_kwargs=GEN, include_original=True)
    response = engine.stream_chat(QUESTION)
    text = "".join(response.response_gen)
    info = response.metadata["aligner"]
    assert text == info["text"] and text.strip() and info["original"].strip() and info["error"] is None
    assert [m.content for m in engine.chat_history] == [QUESTION, text]
    assert response.source_nodes[0].node.get_content() == DOCS[0]


def test_aligned_llm_in_a_chat_engine_async(rag):
    llm = AlignedLLM(llm=rag.llm, aligner=rag.aligner, generation_kwargs=GEN)
    engine = rag.index.as_chat_engine(chat_mode="context", llm=llm, similarity_top_k=1)

    async def main():
        response = await engine.astream_chat(QUESTION)
        return "".join([d async for d in response.async_response_gen()])

    with recording() as (events, _):
        text = asyncio.run(main())
    assert text.strip()
    assert engine.chat_history[-1].content == text  # the conversation keeps the corrected answer
    ends = [e.response for e in events.of("LLMCompletionEndEvent") if "aligner" in (e.response.raw or {})]
    (end,) = ends  # the aligned call, as observability sees it: the corrected text and the correction's usage
    assert end.text == text and 0 < end.raw["usage"]["completion_tokens"] <= GEN["max_new_tokens"]


def test_postprocessor_reloads_its_aligner_from_a_dict(rag):
    pp = rag.postprocessor(top_n=1)
    data = pp.to_dict()
    assert data["aligner"]["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    again = AlignerNodePostprocessor.from_dict(data)  # no aligner=: the packaged model is loaded again
    assert again.to_dict() == data and again.aligner is not rag.aligner
    nodes = rag.index.as_retriever(similarity_top_k=2).retrieve(QUESTION)
    out = again.postprocess_nodes(nodes, query_str=QUESTION)
    assert [ORIGINAL_TEXT_KEY in n.node.metadata for n in out] == [True, False]
    again.aligner.close()
