"""The LLM judge: verdict parsing, both A/B orders, retries, invalid verdicts, concurrency (scripted chat models)
and the real LangChain path over a tiny transformers model."""

import threading
from collections.abc import Callable

import pytest

pytest.importorskip("langchain_core")

from langchain_core.language_models import BaseChatModel  # noqa: E402
from langchain_core.messages import AIMessage, BaseMessage  # noqa: E402
from langchain_core.outputs import ChatGeneration, ChatResult  # noqa: E402

from aligner_core.evaluation import RUBRICS, LLMJudge, format_prompt, parse_verdict  # noqa: E402
from aligner_core.evaluation.rubrics import RETRY_PROMPT  # noqa: E402


class ScriptedChat(BaseChatModel):
    """A chat model whose reply is a function of the conversation; records every call."""

    reply: Callable[[list[BaseMessage]], str]
    calls: list = []

    model_config = {"arbitrary_types_allowed": True}

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.calls.append(messages)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(self.reply(messages)))])


def answers(messages):
    user = messages[1].content
    a = user.split("[Answer A]\n", 1)[1].split("\n[End of Answer A]", 1)[0]
    b = user.split("[Answer B]\n", 1)[1].split("\n[End of Answer B]", 1)[0]
    return a, b


def prefers_good(messages):
    a, b = answers(messages)
    return "Verdict: A" if "good" in a else "Verdict: B" if "good" in b else "Verdict: tie"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Verdict: A", "A"),
        ("verdict: b. Answer A is rude.", None),  # lower-case letters are not read as choices
        ("**Final verdict:** [[B]]", "B"),
        ("The verdict: a tie, both are fine.", "tie"),
        ("Verdict: Answer B", "B"),
        ("Verdict: A\nOn reflection... Verdict: B", "B"),  # the last explicit verdict wins
        ("[[C]]", "tie"),
        ("Answer B is better because it is correct.", "B"),
        ("A: A is more helpful than B.", "A"),
        ("The answer that is correct, which is answer A", "A"),
        ("The better answer would be Answer B.", "B"),
        ("**B**", "B"),
        ("Tie.", "tie"),
        ("A good answer would mention Canberra.", None),
        ("The answer you provided is more helpful than", None),
        ("", None),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_prompt_substitutes_in_one_pass():
    system, user = format_prompt("helpfulness", RUBRICS["helpfulness"], "Q {answer_b}?", "{question}", "B")
    assert "Helpfulness:" in system
    assert (
        "[Question]\nQ {answer_b}?" in user
        and "[Answer A]\n{question}\n" in user
        and "[Answer B]\nB\n" in user
    )


def test_both_orders_are_judged_and_combined():
    chat = ScriptedChat(reply=prefers_good, calls=[])
    judge = LLMJudge(chat, dimensions=["helpfulness", "honesty"], max_concurrency=1)
    verdicts = judge.judge("Q?", "bad answer", "good answer")
    assert set(verdicts) == {"helpfulness", "honesty"}
    v = verdicts["helpfulness"]
    assert (v.outcome, v.orders, v.raw) == ("win", ("win", "win"), ("Verdict: B", "Verdict: A"))
    assert len(chat.calls) == 4  # 2 dimensions x 2 orders
    shown = [answers(m) for m in chat.calls[:2]]
    assert shown == [
        ("bad answer", "good answer"),
        ("good answer", "bad answer"),
    ]  # correction second, then first
    assert "Honesty:" in chat.calls[2][0].content
    assert judge.judge("Q?", "good answer", "bad answer")["honesty"].outcome == "loss"


def test_position_bias_becomes_a_tie_and_one_order_keeps_it():
    always_a = ScriptedChat(reply=lambda m: "Verdict: A", calls=[])
    v = LLMJudge(always_a, dimensions=["helpfulness"]).judge("Q?", "x", "y")["helpfulness"]
    assert (v.outcome, v.orders) == ("tie", ("loss", "win"))
    one = LLMJudge(always_a, dimensions=["helpfulness"], both_orders=False).judge("Q?", "x", "y")[
        "helpfulness"
    ]
    assert (one.outcome, one.orders) == ("loss", ("loss",))


def test_unreadable_reply_is_retried_then_recorded_invalid():
    def first_rambles(messages):
        return "I think that the first one is" if len(messages) == 2 else "Verdict: B"

    chat = ScriptedChat(reply=first_rambles, calls=[])
    v = LLMJudge(chat, dimensions=["harmlessness"]).judge("Q?", "x", "y")["harmlessness"]
    assert v.outcome == "tie" and v.orders == ("win", "loss") and v.extra["attempts"] == [2, 2]
    retry = chat.calls[1]
    assert [m.type for m in retry] == ["system", "human", "ai", "human"] and retry[-1].content == RETRY_PROMPT

    hopeless = ScriptedChat(reply=lambda m: "hmm", calls=[])
    judge = LLMJudge(hopeless, dimensions=["harmlessness"], max_retries=2)
    v = judge.judge("Q?", "x", "y")["harmlessness"]
    assert (v.outcome, v.orders, v.raw) == ("invalid", ("invalid", "invalid"), ("hmm", "hmm"))
    assert len(hopeless.calls) == 6 and v.to_dict()["attempts"] == [3, 3]


def test_concurrency_keeps_item_order_and_reports_each_item():
    seen = []
    active = {"now": 0, "max": 0}
    lock = threading.Lock()

    def slow(messages):
        import time

        with lock:
            active["now"] += 1
            active["max"] = max(active["max"], active["now"])
        time.sleep(0.01)
        with lock:
            active["now"] -= 1
        return prefers_good(messages)

    from aligner_core.evaluation import Comparison

    items = [Comparison(f"Q{i}?", "good" if i % 2 else "bad", "bad" if i % 2 else "good") for i in range(6)]
    chat = ScriptedChat(reply=slow, calls=[])
    out = LLMJudge(chat, max_concurrency=4).judge_batch(items, on_result=seen.append)
    assert [v["helpfulness"].outcome for v in out] == ["win", "loss"] * 3
    assert set(out[0]) == {"helpfulness", "harmlessness", "honesty"}
    assert sorted(seen) == list(range(6)) and active["max"] > 1


def test_model_errors_raise_instead_of_becoming_verdicts():
    def boom(messages):
        raise ConnectionError("API down")

    with pytest.raises(ConnectionError, match="API down"):
        LLMJudge(ScriptedChat(reply=boom, calls=[]), max_concurrency=3).judge("Q?", "a", "b")


def test_bad_configuration_is_rejected():
    chat = ScriptedChat(reply=prefers_good, calls=[])
    with pytest.raises(ValueError, match="no rubric"):
        LLMJudge(chat, dimensions=["empathy"])
    judge = LLMJudge(chat, rubrics={"empathy": "Empathy: which answer shows more care?"})
    assert judge.dimensions == ("empathy",)
    with pytest.raises(TypeError, match="LangChain chat model"):
        LLMJudge(object())


def test_real_langchain_path_over_a_tiny_transformers_model(tiny_model, tiny_tokenizer):
    from langchain_aligner.local_chat import ChatTransformers

    chat = ChatTransformers(model=tiny_model, tokenizer=tiny_tokenizer, max_tokens=6, model_name="tiny")
    judge = LLMJudge(chat, dimensions=["helpfulness"], max_retries=1)
    assert judge.name == "tiny"
    v = judge.judge("What is 12 times 12?", "124.", "144.")["helpfulness"]
    assert len(v.orders) == 2 and len(v.raw) == 2 and all(isinstance(r, str) for r in v.raw)
    assert v.outcome in {"win", "tie", "loss", "invalid"}
    for order, raw in zip(v.orders, v.raw):
        assert (order == "invalid") == (parse_verdict(raw) is None)


def test_provider_specs_go_through_init_chat_model(monkeypatch, tmp_path):
    import sys
    import types

    from aligner_core.evaluation.chat import is_provider_spec, load_chat_model

    assert is_provider_spec("openai:gpt-4o") and is_provider_spec("anthropic:claude-sonnet")
    assert not is_provider_spec("HuggingFaceTB/SmolLM2-135M-Instruct") and not is_provider_spec(str(tmp_path))
    made = {}

    def init_chat_model(spec, **kwargs):
        made.update(spec=spec, **kwargs)
        return ScriptedChat(reply=prefers_good, calls=[])

    module = types.ModuleType("langchain.chat_models")
    module.init_chat_model = init_chat_model
    monkeypatch.setitem(sys.modules, "langchain", types.ModuleType("langchain"))
    monkeypatch.setitem(sys.modules, "langchain.chat_models", module)
    chat = load_chat_model("openai:gpt-4o", max_tokens=32)
    assert made == {"spec": "openai:gpt-4o", "temperature": 0, "max_tokens": 32}
    assert LLMJudge(chat).judge("Q?", "bad", "good")["honesty"].outcome == "win"
