"""AlignedLLM as the LLM of real chat engines, all three modes, over a VectorStoreIndex with the packaged MiniLM:
SmolLM2 answers (and condenses) as the upstream and corrects as the Aligner. Counted: one correction per user turn,
grounded on the retrieved text; the stream the user reads is the correction."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("sentence_transformers")

from llama_index.core import Document, VectorStoreIndex  # noqa: E402

from llamaindex_aligner import AlignedLLM, SentenceTransformerEmbedding, huggingface_llm  # noqa: E402
from tests.fixtures.llamaindex_helpers import PromptSpy, recording  # noqa: E402

pytestmark = pytest.mark.integration

DOCS = [
    "Canberra is the capital city of Australia. Sydney is its largest city.",
    "Spiders are arachnids and have eight legs. Insects have six legs.",
]
GEN = {"max_new_tokens": 8}


@pytest.fixture(scope="module")
def index():
    return VectorStoreIndex.from_documents(
        [Document(text=t) for t in DOCS], embed_model=SentenceTransformerEmbedding()
    )


@pytest.mark.parametrize("mode", ["condense_question", "condense_plus_context", "context"])
def test_chat_engine_corrects_one_grounded_answer_per_turn(smollm2, index, monkeypatch, mode):
    spy = PromptSpy(smollm2, monkeypatch)
    llm = AlignedLLM(llm=huggingface_llm(smollm2, max_new_tokens=8), aligner=smollm2, generation_kwargs=GEN)
    engine = index.as_chat_engine(chat_mode=mode, llm=llm, similarity_top_k=1)
    engine.chat("I am planning a trip to Australia.")
    assert len(spy.prompts) == 1
    with recording() as (events, _):
        streamed = engine.stream_chat("What is its capital?")
        text = "".join(streamed.response_gen)
    assert len(spy.prompts) == 2  # the condensed question (in the condense modes) passed through
    assert DOCS[0] in spy.prompts[-1]  # the Aligner read the retrieved text the answer relies on
    details = [
        e.response.additional_kwargs["aligner"]
        for e in events.of("LLMCompletionEndEvent")
        if "aligner" in (e.response.additional_kwargs or {})
    ]
    final = [d for d in details if not d.get("skipped")]
    assert len(final) == 1 and text == final[0]["text"]  # what the user read is the correction, once
    if mode != "context":
        assert [d["skipped"] for d in details if d.get("skipped")] == ["intermediate_step"]
    assert engine.chat_history[-1].content == text
