"""Structured output through AlignedLLM and AlignedQueryEngine: passed through by default (it parses), corrected on
request and kept only when the correction validates as the requested model."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import ChatMessage, TextBlock  # noqa: E402
from llama_index.core.base.response.schema import PydanticResponse  # noqa: E402
from llama_index.core.bridge.pydantic import BaseModel  # noqa: E402
from llama_index.core.program import LLMTextCompletionProgram  # noqa: E402
from llama_index.core.prompts import PromptTemplate  # noqa: E402
from llama_index.core.query_engine import CustomQueryEngine  # noqa: E402

from aligner_core import UnreadableContentError  # noqa: E402
from llamaindex_aligner import AlignedLLM, AlignedQueryEngine  # noqa: E402
from tests.fixtures.llamaindex_helpers import QUESTION, PromptSpy, ScriptedLLM, recording  # noqa: E402


class Capital(BaseModel):
    city: str
    country: str


JSON = '{"city": "Sydney", "country": "Australia"}'
PROMPT = PromptTemplate("Name the capital of {country} as JSON.")


def details(events) -> list[dict]:
    """The aligner details of every AlignedLLM call, from the LLM end events observability sees."""
    ends = events.of("LLMChatEndEvent") + events.of("LLMCompletionEndEvent")
    return [
        e.response.additional_kwargs["aligner"]
        for e in ends
        if "aligner" in (e.response.additional_kwargs or {})
    ]


@pytest.mark.parametrize("chat_model", [False, True], ids=["completion", "chat"])
def test_structured_llm_parses_and_nothing_is_corrected(tiny_aligner, monkeypatch, chat_model):
    spy = PromptSpy(tiny_aligner, monkeypatch)
    llm = AlignedLLM(llm=ScriptedLLM(answer=JSON, chat_model=chat_model), aligner=tiny_aligner)
    with recording() as (events, _):
        response = llm.as_structured_llm(Capital).chat([ChatMessage(role="user", content=QUESTION)])
        assert response.raw == Capital(city="Sydney", country="Australia")
        assert llm.structured_predict(Capital, PROMPT, country="Australia").city == "Sydney"
        assert asyncio.run(llm.astructured_predict(Capital, PROMPT, country="Australia")).city == "Sydney"
        assert list(llm.stream_structured_predict(Capital, PROMPT, country="Australia"))[-1].city == "Sydney"

        async def astream():
            return [
                part
                async for part in await llm.astream_structured_predict(Capital, PROMPT, country="Australia")
            ]

        assert asyncio.run(astream())[-1].city == "Sydney"
        program = LLMTextCompletionProgram.from_defaults(output_cls=Capital, prompt=PROMPT, llm=llm)
        assert program(country="Australia").country == "Australia"
    assert spy.prompts == []  # structured output is data the app parses: passed through, never generated on
    seen = details(events)
    assert len(seen) == 6 and {d["skipped"] for d in seen} == {"structured_output"}
    assert {d["metadata"]["structured"] for d in seen} == {"json_schema"}


def test_opt_in_keeps_a_correction_only_if_it_validates(tiny_aligner):
    llm = AlignedLLM(llm=ScriptedLLM(answer=JSON), aligner=tiny_aligner, correct_structured=True)
    with recording() as (events, _):
        result = llm.structured_predict(Capital, PROMPT, country="Australia")
    assert result == Capital(
        city="Sydney", country="Australia"
    )  # the tiny Aligner writes no JSON: original kept
    (info,) = details(events)
    assert info["skipped"] == "structured_output_invalid" and info["metadata"]["invalid_reason"]
    assert info["completion_tokens"] > 0  # it was corrected, then rejected

    fixed = '{"city": "Canberra", "country": "Australia"}'
    correct = tiny_aligner.correct

    def corrects_to_valid_json(question, answer, **kwargs):
        return dataclasses.replace(correct(question, answer, **kwargs), text=fixed, changed=True)

    tiny_aligner.correct = (
        corrects_to_valid_json  # an Aligner that writes valid JSON (the adapter is under test)
    )
    assert llm.structured_predict(Capital, PROMPT, country="Australia").city == "Canberra"
    assert (
        AlignedLLM(llm=ScriptedLLM(answer=JSON), aligner=tiny_aligner)
        .structured_predict(Capital, PROMPT, country="Australia")
        .city
        == "Sydney"
    )  # not opted in: passed through


def test_pydantic_response_of_a_query_engine(tiny_aligner):
    class Structured(CustomQueryEngine):
        def custom_query(self, query_str: str) -> PydanticResponse:
            return PydanticResponse(Capital(city="Sydney", country="Australia"))

    passed = AlignedQueryEngine(Structured(), tiny_aligner).query(QUESTION)
    assert passed.response.city == "Sydney" and passed.metadata["aligner"]["skipped"] == "structured_output"
    opted = AlignedQueryEngine(Structured(), tiny_aligner, correct_structured=True).query(QUESTION)
    assert opted.response == passed.response
    assert opted.metadata["aligner"]["skipped"] == "structured_output_invalid"
    assert json.loads(opted.metadata["aligner"]["original"]) == passed.response.model_dump()


def test_text_blocks_are_corrected_as_their_text_and_unreadable_blocks_fail(tiny_aligner):
    class Blocks(ScriptedLLM):
        blocks: list = []

        def chat(self, messages, **kwargs):
            from llama_index.core.base.llms.types import ChatResponse

            # model_construct: a block type this LlamaIndex does not know yet (a newer provider's) gets through
            return ChatResponse(
                message=ChatMessage.model_construct(
                    role="assistant", blocks=list(self.blocks), additional_kwargs={}
                )
            )

    parts = [TextBlock(text="The capital of Australia"), TextBlock(text="is Sydney.")]
    llm = AlignedLLM(llm=Blocks(blocks=parts, chat_model=True), aligner=tiny_aligner, include_original=True)
    response = llm.chat([ChatMessage(role="user", content=QUESTION)])
    info = response.additional_kwargs["aligner"]
    assert (
        info["original"] == "The capital of Australia\nis Sydney."
    )  # joined as ChatMessage.content joins them
    assert [b.text for b in response.message.blocks] == [info["text"]]

    class Hologram(BaseModel):
        block_type: str = "hologram"

    odd = AlignedLLM(
        llm=Blocks(blocks=[Hologram()], chat_model=True), aligner=tiny_aligner, on_error="passthrough"
    )
    with pytest.raises(UnreadableContentError, match="hologram"):  # fails closed, whatever the error policy
        odd.chat([ChatMessage(role="user", content=QUESTION)])
