"""AlignerNodePostprocessor on the tiny model: batching, identity, hidden originals, gating, errors, async, tracing."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import SummaryIndex  # noqa: E402
from llama_index.core.bridge.pydantic import ValidationError  # noqa: E402
from llama_index.core.postprocessor.types import BaseNodePostprocessor  # noqa: E402
from llama_index.core.prompts import PromptTemplate  # noqa: E402
from llama_index.core.schema import ImageNode, MetadataMode, NodeRelationship, NodeWithScore, TextNode  # noqa: E402

from aligner_core import AlignerError, ContextOverflowError, GenerationOptionError  # noqa: E402
from llamaindex_aligner import ORIGINAL_TEXT_KEY, AlignerNodePostprocessor  # noqa: E402
from tests.fixtures.llamaindex_helpers import OVERLONG, QUESTION, recording, span_names, text_nodes, tiny_llm  # noqa: E402


def expected_texts(aligner, texts, **gen):
    """What the Aligner itself writes for these texts, each read beside the others (its neighbours) as context;
    an empty correction keeps the original."""
    pairs = [
        {"question": QUESTION, "answer": t, "context": [o for j, o in enumerate(texts) if j != i]}
        for i, t in enumerate(texts)
    ]
    fixes = aligner.correct_batch(pairs, **gen)
    return [f.text if f.text.strip() else t for f, t in zip(fixes, texts)]


def test_corrects_every_text_node_and_keeps_identity(tiny_aligner):
    nodes = text_nodes()
    image = NodeWithScore(node=ImageNode(id_="img", image="aGVsbG8="), score=0.8)
    before = [n.node.get_content() for n in nodes]
    pp = AlignerNodePostprocessor(aligner=tiny_aligner)

    with recording() as (events, _):
        out = pp.postprocess_nodes([*nodes, image], query_str=QUESTION)

    assert [n.node.node_id for n in out] == ["n1", "n2", "n3", "img"]
    assert [n.score for n in out] == [0.9, 0.5, 0.7, 0.8]
    assert [n.node.get_content() for n in out[:3]] == expected_texts(tiny_aligner, before)
    assert out[3] is image  # no text: passed through untouched
    (start,) = events.of("AlignerStartEvent")
    assert (start.num_items, start.num_selected) == (4, 3)  # the three texts go in one batched pass
    for old, new, text in zip(nodes, out, before):
        assert new.node.metadata[ORIGINAL_TEXT_KEY] == text
        assert {k: v for k, v in new.node.metadata.items() if k != ORIGINAL_TEXT_KEY} == old.node.metadata
        assert new.node.relationships[NodeRelationship.SOURCE].node_id == f"doc-{old.node.node_id}"
        assert ORIGINAL_TEXT_KEY in new.node.excluded_llm_metadata_keys
        assert ORIGINAL_TEXT_KEY in new.node.excluded_embed_metadata_keys
        for mode in (MetadataMode.LLM, MetadataMode.EMBED):
            assert ORIGINAL_TEXT_KEY not in new.node.get_content(metadata_mode=mode)
    assert [n.node.get_content() for n in nodes] == before  # the input nodes are copied, never edited
    assert all(ORIGINAL_TEXT_KEY not in n.node.metadata for n in nodes)


def test_empty_input_and_missing_query(tiny_aligner):
    pp = AlignerNodePostprocessor(aligner=tiny_aligner)
    assert pp.postprocess_nodes([], query_str=QUESTION) == []
    with pytest.raises(ValueError, match="query"):
        pp.postprocess_nodes(text_nodes())


def test_top_n_corrects_only_the_best_scored_nodes(tiny_aligner):
    nodes = text_nodes()
    nodes.append(NodeWithScore(node=TextNode(id_="n4", text="Insects have six legs."), score=None))
    out = AlignerNodePostprocessor(aligner=tiny_aligner, top_n=2).postprocess_nodes(nodes, query_str=QUESTION)
    corrected = [n.node.node_id for n in out if ORIGINAL_TEXT_KEY in n.node.metadata]
    assert corrected == ["n1", "n3"]  # scores 0.9 and 0.7, in their original order
    assert [n.node.node_id for n in out] == ["n1", "n2", "n3", "n4"]
    assert out[1] is nodes[1] and out[3] is nodes[3]


def test_inspector_gates_which_nodes_are_corrected(tiny_aligner):
    seen = []

    def inspector(question: str, text: str) -> float:
        seen.append((question, text))
        return 0.0 if "Sydney" in text else 1.0

    nodes = text_nodes()
    out = AlignerNodePostprocessor(aligner=tiny_aligner, inspector=inspector).postprocess_nodes(
        nodes, query_str=QUESTION
    )
    assert [ORIGINAL_TEXT_KEY in n.node.metadata for n in out] == [True, False, False]
    assert [text for _, text in seen] == [n.node.get_content() for n in nodes]
    assert all(
        QUESTION in question and "Spiders" in question for question, _ in seen[:1]
    )  # it sees the neighbours
    assert out[0].node.get_content() == expected_texts(tiny_aligner, [n.node.get_content() for n in nodes])[0]


def test_generation_options_apply(tiny_aligner):
    pp = AlignerNodePostprocessor(aligner=tiny_aligner, generation_kwargs={"max_new_tokens": 3})
    with recording() as (events, _):
        out = pp.postprocess_nodes(text_nodes(), query_str=QUESTION)
    (end,) = events.of("AlignerEndEvent")
    assert 0 < end.completion_tokens <= 3 * 3
    texts = [n.node.metadata[ORIGINAL_TEXT_KEY] for n in out]
    assert [n.node.get_content() for n in out] == expected_texts(tiny_aligner, texts, max_new_tokens=3)


def test_a_node_corrected_twice_keeps_the_first_original(tiny_aligner):
    pp = AlignerNodePostprocessor(aligner=tiny_aligner)
    first = pp.postprocess_nodes(text_nodes(), query_str=QUESTION)
    second = pp.postprocess_nodes(first, query_str=QUESTION)
    assert [n.node.metadata[ORIGINAL_TEXT_KEY] for n in second] == [
        n.node.get_content() for n in text_nodes()
    ]
    assert second[0].node.excluded_llm_metadata_keys.count(ORIGINAL_TEXT_KEY) == 1


def test_on_error_raise_and_passthrough(tiny_aligner):
    nodes = text_nodes()
    nodes.insert(1, NodeWithScore(node=TextNode(id_="long", text=OVERLONG), score=0.8))
    with pytest.raises(ContextOverflowError):
        AlignerNodePostprocessor(aligner=tiny_aligner).postprocess_nodes(nodes, query_str=QUESTION)

    pp = AlignerNodePostprocessor(aligner=tiny_aligner, on_error="passthrough")
    with recording() as (events, _):
        out = pp.postprocess_nodes(nodes, query_str=QUESTION)
    assert out[1] is nodes[1]  # the node the Aligner failed on is served as it was
    assert [ORIGINAL_TEXT_KEY in n.node.metadata for n in out] == [True, False, True, True]
    (end,) = events.of("AlignerEndEvent")
    assert (end.num_items, end.num_errors) == (4, 1)
    assert end.error.startswith("ContextOverflowError")


def test_on_overflow_truncate_corrects_a_long_node(tiny_aligner):
    nodes = [NodeWithScore(node=TextNode(id_="long", text=OVERLONG), score=0.8), *text_nodes()]
    pp = AlignerNodePostprocessor(aligner=tiny_aligner, generation_kwargs={"on_overflow": "truncate"})
    out = pp.postprocess_nodes(nodes, query_str=QUESTION)
    assert out[0].node.metadata[ORIGINAL_TEXT_KEY] == OVERLONG  # the Aligner read its head, nothing failed
    with pytest.raises(ValueError, match="on_overflow"):
        AlignerNodePostprocessor(aligner=tiny_aligner, generation_kwargs={"on_overflow": "cut"})


def test_a_closed_aligner_fails_every_node(tiny_aligner):
    tiny_aligner.close()  # a real outage: the Aligner's worker is gone
    nodes = text_nodes()
    with recording() as (events, _):
        out = asyncio.run(
            AlignerNodePostprocessor(aligner=tiny_aligner, on_error="passthrough").apostprocess_nodes(
                nodes, query_str=QUESTION
            )
        )
    assert all(a is b for a, b in zip(out, nodes))
    (end,) = events.of("AlignerEndEvent")
    assert end.num_errors == 3 and end.error.startswith("SchedulerClosedError")
    with pytest.raises(AlignerError, match="closed"):
        asyncio.run(
            AlignerNodePostprocessor(aligner=tiny_aligner).apostprocess_nodes(nodes, query_str=QUESTION)
        )


def test_async_awaits_the_core_and_matches_sync(tiny_aligner):
    assert AlignerNodePostprocessor._apostprocess_nodes is not BaseNodePostprocessor._apostprocess_nodes
    pp = AlignerNodePostprocessor(aligner=tiny_aligner)
    sync = pp.postprocess_nodes(text_nodes(), query_str=QUESTION)

    async def main():
        return await asyncio.gather(
            pp.apostprocess_nodes(text_nodes(), query_str=QUESTION),
            pp.apostprocess_nodes(text_nodes(), query_str="Why?"),
        )

    with recording() as (events, spans):
        first, other = asyncio.run(main())
    assert [n.node.get_content() for n in first] == [n.node.get_content() for n in sync]
    assert [n.node.metadata for n in first] == [n.node.metadata for n in sync]
    assert len(other) == 3
    assert span_names(spans).count("AlignerNodePostprocessor._apostprocess_nodes") == 2
    assert len(events.of("AlignerEndEvent")) == 2


def test_instrumentation_span_and_events(tiny_aligner):
    pp = AlignerNodePostprocessor(aligner=tiny_aligner)
    with recording() as (events, spans):
        pp.postprocess_nodes(text_nodes(), query_str=QUESTION)
    assert "AlignerNodePostprocessor._postprocess_nodes" in span_names(spans)
    (start,) = events.of("AlignerStartEvent")
    (end,) = events.of("AlignerEndEvent")
    assert start.component == end.component == "node_postprocessor"
    assert start.query == QUESTION and start.span_id == end.span_id and start.span_id is not None
    assert end.num_items == 3 and end.num_errors == 0 and end.error is None
    assert end.num_corrected <= 3 and end.num_changed <= end.num_corrected
    assert end.prompt_tokens > 0 and end.completion_tokens > 0 and end.latency_s > 0


def test_settings_are_checked(tiny_aligner):
    pp = AlignerNodePostprocessor(aligner=tiny_aligner, top_n=2)
    assert pp.class_name() == "AlignerNodePostprocessor"
    assert pp.aligner is tiny_aligner
    assert pp.to_dict()["top_n"] == 2 and "inspector" not in pp.to_dict()
    with pytest.raises(ValidationError):
        AlignerNodePostprocessor(aligner=tiny_aligner, top_k=2)  # not a setting (top_n is): fails loudly
    with pytest.raises(ValidationError):
        AlignerNodePostprocessor(aligner=tiny_aligner, top_n=0)
    with pytest.raises(ValidationError):
        AlignerNodePostprocessor(aligner=tiny_aligner, on_error="ignore")
    with pytest.raises(GenerationOptionError, match="max_tokens"):
        AlignerNodePostprocessor(aligner=tiny_aligner, generation_kwargs={"max_tokens": 8})
    with pytest.raises(TypeError, match="Aligner"):
        AlignerNodePostprocessor(aligner="not an aligner")


def test_in_a_query_engine_the_llm_sees_corrections_not_originals(tiny_aligner):
    llm = tiny_llm(tiny_aligner)
    nodes = [n.node for n in text_nodes()]
    qa = PromptTemplate("Context: {context_str}\nQ: {query_str}\nA:")
    engine = SummaryIndex(nodes).as_query_engine(
        llm=llm, text_qa_template=qa, node_postprocessors=[AlignerNodePostprocessor(aligner=tiny_aligner)]
    )
    with recording() as (events, _):
        response = engine.query(QUESTION)
    assert [n.node.metadata[ORIGINAL_TEXT_KEY] for n in response.source_nodes] == [n.text for n in nodes]
    (llm_call,) = [
        e for e in events.of("LLMCompletionStartEvent") if e.model_dict.get("class_name") != "Aligner"
    ]
    for n in response.source_nodes:
        assert n.node.get_content() in llm_call.prompt
    assert ORIGINAL_TEXT_KEY not in llm_call.prompt
    assert [n.text for n in nodes] == [n.node.get_content() for n in text_nodes()]  # the index is untouched
