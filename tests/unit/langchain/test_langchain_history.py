"""Conversation history through the LangChain adapter: what each entry point hands the core as ``history``."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.chat_history import InMemoryChatMessageHistory
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import RunnableLambda
from langchain_core.runnables.history import RunnableWithMessageHistory
from langchain_core.tracers.run_collector import RunCollectorCallbackHandler

from aligner_core import Aligner
from langchain_aligner import (
    AlignedChatModel,
    AlignerRunnable,
    ChatTransformers,
    UnsupportedInputError,
    with_aligner,
)
from tests.fixtures.langchain_helpers import ANSWER, QUESTION

EARLIER = [
    {"role": "user", "content": "Hi, I study spiders."},
    {"role": "assistant", "content": "Nice! Ask away."},
]
MESSAGES = [HumanMessage("Hi, I study spiders."), AIMessage("Nice! Ask away.")]


@pytest.fixture(scope="module")
def aligner(tiny_model, tiny_tokenizer):
    a = Aligner.from_model(tiny_model, tiny_tokenizer, template="aligner-v1", name="tiny", max_new_tokens=8)
    yield a
    a.close()


def fake(*answers: str) -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(a) for a in answers]))


def turns_of(message: AIMessage) -> int | None:
    return message.response_metadata["aligner"]["metadata"].get("history_turns")


# -- AlignedChatModel -----------------------------------------------------------------------------


def test_chat_model_passes_the_messages_before_the_question(aligner):
    tool_call = {"name": "lookup", "args": {}, "id": "c1", "type": "tool_call"}
    conversation = [
        SystemMessage("Be brief."),
        HumanMessage(
            [
                {"type": "text", "text": "Hi, I "},
                {"type": "image_url", "image_url": {"url": "x"}},
                {"type": "text", "text": "study spiders."},
            ]
        ),  # text parts joined, the image dropped
        AIMessage("", tool_calls=[tool_call]),  # only calls a tool: skipped
        ToolMessage("spiders: 8 legs", tool_call_id="c1"),  # a tool result: skipped
        AIMessage("Nice! Ask away."),
        HumanMessage(QUESTION),
    ]
    expected = [{"role": "system", "content": "Be brief."}, *EARLIER]
    collector = RunCollectorCallbackHandler()
    out = AlignedChatModel(llm=fake(ANSWER), aligner=aligner).invoke(
        conversation, config={"callbacks": [collector]}
    )
    assert out.content == aligner.correct(QUESTION, ANSWER, history=expected).text
    assert turns_of(out) == 3

    runs = [collector.traced_runs[0]]
    while runs[-1].child_runs:
        runs.append(runs[-1].child_runs[-1])
    traced = runs[-1]  # the Aligner's own chat-model run shows the history before the pair
    assert traced.name == "Aligner"
    assert traced.inputs["prompts"] == [
        f"System: Be brief.\nHuman: Hi, I study spiders.\nAI: Nice! Ask away.\nHuman: {QUESTION}\nAI: {ANSWER}"
    ]
    assert (
        traced.outputs["generations"][0][0]["message"]["kwargs"]["response_metadata"]["aligner"][
            "history_turns"
        ]
        == 3
    )


def test_chat_model_stream_and_async_pass_the_history(aligner):
    conversation = [*MESSAGES, HumanMessage(QUESTION)]
    expected = aligner.correct(QUESTION, ANSWER, history=EARLIER).text
    chat = AlignedChatModel(llm=GenericFakeChatModel(messages=iter([AIMessage(ANSWER)] * 3)), aligner=aligner)
    assert "".join(c.text for c in chat.stream(conversation)) == expected

    async def main() -> list[str]:
        message = await chat.ainvoke(conversation)
        parts = [c.text async for c in chat.astream(conversation)]
        return [message.text, "".join(parts)]

    assert asyncio.run(main()) == [expected, expected]


def test_a_single_question_has_no_history(aligner):
    out = AlignedChatModel(llm=fake(ANSWER), aligner=aligner).invoke(QUESTION)
    assert out.content == aligner.correct(QUESTION, ANSWER).text and turns_of(out) is None


# -- AlignerRunnable ------------------------------------------------------------------------------


def test_runnable_reads_history_key_chat_history_and_configurable(aligner):
    expected = aligner.correct(QUESTION, ANSWER, history=EARLIER).text
    stage = AlignerRunnable(aligner=aligner)
    assert stage.invoke({"question": QUESTION, "answer": ANSWER, "history": MESSAGES}) == expected
    assert (
        stage.invoke({"question": QUESTION, "answer": ANSWER, "chat_history": EARLIER}) == expected
    )  # dicts too
    configured = {"configurable": {"history": MESSAGES}}
    assert stage.invoke({"question": QUESTION, "answer": ANSWER}, config=configured) == expected
    custom = AlignerRunnable(aligner=aligner, history_key="turns", question=QUESTION)
    assert (
        custom.invoke(
            {"answer": ANSWER, "turns": [("human", "Hi, I study spiders."), ("ai", "Nice! Ask away.")]}
        )
        == expected
    )
    message = stage.invoke({"question": QUESTION, "answer": AIMessage(ANSWER), "history": MESSAGES})
    assert message.content == expected and turns_of(message) == 2


def test_runnable_declares_the_history_and_rejects_a_str(aligner):
    stage = AlignerRunnable(aligner=aligner, history_key="turns")
    pair = stage.get_input_schema().model_json_schema()["$defs"]["AlignerRunnablePair"]
    assert "turns" in pair["properties"] and "turns" not in pair.get("required", [])
    assert [s.id for s in stage.config_specs] == ["question", "turns"]
    with pytest.raises(UnsupportedInputError, match="'turns'"):
        stage.invoke({"question": QUESTION, "answer": ANSWER, "turns": "User: hi"})


def test_runnable_batch_and_stream_pass_each_history(aligner):
    other = [{"role": "user", "content": "Do ants have legs?"}, {"role": "assistant", "content": "Six."}]
    inputs = [
        {"question": QUESTION, "answer": ANSWER, "history": MESSAGES},
        {"question": QUESTION, "answer": ANSWER, "history": other},
        {"question": QUESTION, "answer": ANSWER},
    ]
    expected = [aligner.correct(QUESTION, ANSWER, history=h).text for h in (EARLIER, other, None)]
    stage = AlignerRunnable(aligner=aligner)
    assert stage.batch(inputs) == expected  # one planned correct_batch pass with (q, a, history) items
    assert asyncio.run(stage.abatch(inputs)) == expected
    assert "".join(stage.stream(inputs[0])) == expected[0]


# -- with_aligner ---------------------------------------------------------------------------------


def test_with_aligner_reads_the_history_key_and_message_lists(aligner):
    expected = aligner.correct(QUESTION, ANSWER, history=EARLIER).text
    chain = with_aligner(RunnableLambda(lambda _: ANSWER), aligner=aligner)
    assert chain.invoke({"question": QUESTION, "history": MESSAGES}) == expected
    assert chain.invoke({"question": QUESTION, "chat_history": MESSAGES}) == expected
    assert (
        chain.invoke([*MESSAGES, HumanMessage(QUESTION)]) == expected
    )  # the messages before the last human one
    assert "".join(chain.stream({"question": QUESTION, "history": MESSAGES})) == expected
    assert chain.batch([{"question": QUESTION, "history": MESSAGES}, {"question": QUESTION}]) == [
        expected,
        aligner.correct(QUESTION, ANSWER).text,
    ]
    # a str under the key is a prompt variable (the legacy memories' text buffer): left alone
    assert (
        chain.invoke({"question": QUESTION, "history": "User: hi"}) == aligner.correct(QUESTION, ANSWER).text
    )


def test_runnable_with_message_history_second_turn_sees_the_first(aligner):
    llm = ChatTransformers.from_aligner(aligner, max_tokens=6)  # a real (tiny) upstream chat model
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer briefly."), MessagesPlaceholder("history"), ("human", "{question}")]
    )
    store: dict[str, InMemoryChatMessageHistory] = {}
    chat = RunnableWithMessageHistory(
        with_aligner(prompt | llm, aligner=aligner, include_original=True),
        lambda session_id: store.setdefault(session_id, InMemoryChatMessageHistory()),
        input_messages_key="question",
        history_messages_key="history",
    )
    config = {"configurable": {"session_id": "s1"}}
    first = chat.invoke({"question": "Hi, I study spiders."}, config=config)
    second = chat.invoke({"question": QUESTION}, config=config)
    assert turns_of(first) is None and turns_of(second) == 2
    stored = store["s1"].messages
    assert [m.content for m in stored] == ["Hi, I study spiders.", first.content, QUESTION, second.content]
    earlier = [
        {"role": "user", "content": "Hi, I study spiders."},
        {"role": "assistant", "content": first.content},
    ]
    raw = second.response_metadata["aligner"]["original"]
    redo = aligner.correct(QUESTION, raw, history=earlier)
    assert second.content == (redo.text if redo.text.strip() else raw)  # corrected against the first turn


def test_runnable_with_message_history_over_message_lists(aligner):
    store: dict[str, InMemoryChatMessageHistory] = {}
    chat = RunnableWithMessageHistory(
        with_aligner(
            GenericFakeChatModel(messages=iter([AIMessage("Nice! Ask away."), AIMessage(ANSWER)])),
            aligner=aligner,
        )
        | StrOutputParser(),
        lambda session_id: store.setdefault(session_id, InMemoryChatMessageHistory()),
    )
    config = {"configurable": {"session_id": "s2"}}
    first = chat.invoke([HumanMessage("Hi, I study spiders.")], config=config)
    second = chat.invoke([HumanMessage(QUESTION)], config=config)  # the stored turns come before it
    earlier = [{"role": "user", "content": "Hi, I study spiders."}, {"role": "assistant", "content": first}]
    assert second == aligner.correct(QUESTION, ANSWER, history=earlier).text
