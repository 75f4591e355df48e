"""Structured output and grounding on the LangChain side: structure passes through unless the opt-in, and a
correction of it is kept only when it still validates; retrievers' and tools' results ground ``with_aligner``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_core.tools import tool
from pydantic import BaseModel

from aligner_core import Aligner, Structure
from langchain_aligner import AlignedChatModel, AlignerRunnable, with_aligner
from tests.fixtures.langchain_helpers import QUESTION, ToolBindingFakeChatModel, record_prompts


class City(BaseModel):
    city: str
    temperature_c: int


PARIS = City(city="Paris", temperature_c=21)
JSON = PARIS.model_dump_json()


@pytest.fixture(scope="module")
def aligner(tiny_model, tiny_tokenizer):
    a = Aligner.from_model(tiny_model, tiny_tokenizer, template="aligner-v1", name="tiny", max_new_tokens=8)
    yield a
    a.close()


class JsonUpstream(GenericFakeChatModel):
    """A fake chat model with a real ``with_structured_output`` for the JSON methods (raw message + parser)."""

    def with_structured_output(
        self, schema: Any, *, include_raw: bool = False, method: str = "json_schema", **kwargs: Any
    ) -> Any:
        if method == "function_calling":
            return super().with_structured_output(schema, include_raw=include_raw, **kwargs)

        def parse(message: AIMessage) -> Any:
            return schema.model_validate_json(message.text)

        raw = RunnableLambda(lambda value: self.invoke(value))
        if not include_raw:
            return raw | parse
        return raw | RunnableLambda(lambda m: {"raw": m, "parsed": parse(m), "parsing_error": None})


def test_function_calling_structured_output_passes_through_the_tool_call(aligner):
    call = {"name": "City", "args": {"city": "Paris", "temperature_c": 21}, "id": "s1", "type": "tool_call"}
    upstream = ToolBindingFakeChatModel(messages=iter([AIMessage("", tool_calls=[call])] * 2))
    chat = AlignedChatModel(llm=upstream, aligner=aligner)
    assert chat.with_structured_output(City).invoke(QUESTION) == PARIS
    raw = chat.with_structured_output(City, include_raw=True).invoke(QUESTION)
    assert (
        raw["parsed"] == PARIS and raw["raw"].response_metadata["aligner"]["skipped"] == "structured_output"
    )


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_json_structured_output_passes_through_by_default(aligner, method):
    chat = AlignedChatModel(llm=JsonUpstream(messages=iter([AIMessage(JSON)] * 2)), aligner=aligner)
    assert chat.with_structured_output(City, method=method).invoke(QUESTION) == PARIS
    raw = chat.with_structured_output(City, method=method, include_raw=True).invoke(QUESTION)
    assert (
        raw["raw"].content == JSON
        and raw["raw"].response_metadata["aligner"]["skipped"] == "structured_output"
    )


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_the_opt_in_corrects_and_keeps_only_a_valid_result(aligner, method):
    """The tiny corrector writes no valid JSON: the original comes back, parsed, with the reason recorded."""
    call = {"name": "City", "args": {"city": "Paris", "temperature_c": 21}, "id": "s1", "type": "tool_call"}
    answer = AIMessage(JSON) if method == "json_schema" else AIMessage("", tool_calls=[call])
    upstream = (JsonUpstream if method == "json_schema" else ToolBindingFakeChatModel)(
        messages=iter([answer] * 2)
    )
    chat = AlignedChatModel(llm=upstream, aligner=aligner, correct_structured=True)
    with record_prompts(aligner) as prompts:
        out = chat.with_structured_output(City, method=method, include_raw=True).invoke(QUESTION)
    assert len(prompts) == 1 and '"temperature_c": 21' in prompts[0].replace(
        '":21', '": 21'
    )  # it was corrected
    meta = out["raw"].response_metadata["aligner"]
    assert meta["skipped"] == "structured_output_invalid" and meta["metadata"]["invalid_correction"]
    assert out["parsed"] == PARIS  # what the caller parses still parses and validates
    assert chat.with_structured_output(City, method=method).invoke(QUESTION) == PARIS


def test_a_structured_result_passes_through_a_stage(aligner):
    stage = AlignerRunnable(aligner=aligner, question=QUESTION)
    assert stage.invoke(PARIS) is PARIS and list(stage.stream(PARIS)) == [PARIS]
    opted = AlignerRunnable(aligner=aligner, question=QUESTION, correct_structured=True)
    assert opted.invoke(PARIS) == PARIS  # the tiny corrector's text does not validate: the original stays


def test_a_json_answer_keeps_its_structure_when_the_stage_is_told(aligner):
    stage = AlignerRunnable(
        aligner=aligner, question=QUESTION, structure=Structure("json_schema", City.model_json_schema())
    )
    out = stage.invoke(AIMessage(JSON))
    assert out.content == JSON and out.response_metadata["aligner"]["skipped"] == "structured_output"


class Shelf(BaseRetriever):
    """A retriever over a fixed list of documents."""

    docs: list[Document]

    def _get_relevant_documents(self, query: str, *, run_manager: Any) -> list[Document]:
        return self.docs


def test_with_aligner_is_grounded_on_what_the_chain_retrieved_and_its_tools(aligner):
    retriever = Shelf(docs=[Document("Paris is sunny today.", metadata={"source": "weather.txt"})])

    @tool
    def thermometer(city: str) -> str:
        """Read the thermometer of a city."""
        return "21C"

    def answer(inputs: dict[str, Any]) -> str:
        return f"It is sunny and {thermometer.invoke({'city': 'Paris'})}."

    rag = RunnablePassthrough.assign(docs=lambda x: retriever.invoke(x["question"])) | RunnableLambda(answer)
    with record_prompts(aligner) as prompts:
        out = with_aligner(rag, aligner=aligner).invoke({"question": QUESTION, "context": ["Given: a note."]})
    assert (
        out
        == aligner.correct(
            QUESTION,
            "It is sunny and 21C.",
            context=[
                "Given: a note.",
                {"type": "document", "name": "weather.txt", "content": "Paris is sunny today."},
                {"type": "tool_call", "name": "thermometer", "content": json.dumps({"city": "Paris"})},
                {"type": "tool_result", "name": "thermometer", "content": "21C"},
            ],
        ).text
    )
    assert (
        "Document (weather.txt): Paris is sunny today." in prompts[0]
        and "Tool result (thermometer): 21C" in prompts[0]
    )


def test_a_stage_reads_documents_under_the_context_key(aligner):
    docs = [Document("Canberra is the capital of Australia.")]
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    chain = RunnablePassthrough.assign(
        answer=prompt | GenericFakeChatModel(messages=iter(["Sydney."]))
    ) | AlignerRunnable(aligner=aligner)
    with record_prompts(aligner) as prompts:
        out = chain.invoke({"question": "What is the capital of Australia?", "context": docs})
    assert out.response_metadata["aligner"]["metadata"]["context_items"] == 1
    assert "Document: Canberra is the capital of Australia." in prompts[0]
