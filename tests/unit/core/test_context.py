"""Grounding context: validated, rendered into every template, trimmed first, recorded, seen by the inspector."""

from __future__ import annotations

import pytest

from aligner_core import Aligner, InvalidInputError, get_template, normalize_context, render_prompt
from aligner_core.context import ContextItem, context_messages, context_of
from aligner_core.history import fold_history

TOOL_TURN = [
    {"type": "tool_call", "name": "get_weather", "content": {"city": "Paris"}},
    {"type": "tool_result", "name": "get_weather", "content": "sunny, 21C"},
]
Q, A = "What is the weather in Paris?", "It is sunny and 21C in Paris."


def test_items_are_validated_and_normalised():
    items = normalize_context(
        [
            *TOOL_TURN,
            "Paris is in France.",
            {"kind": "document", "text": "doc", "name": "wiki"},
            ContextItem("document", "kept"),
            {"type": "document", "content": "  "},
        ]
    )
    assert items == (
        ContextItem("tool_call", '{"city": "Paris"}', "get_weather"),
        ContextItem("tool_result", "sunny, 21C", "get_weather"),
        ContextItem("document", "Paris is in France."),
        ContextItem("document", "doc", "wiki"),
        ContextItem("document", "kept"),
    )  # blank items are dropped
    assert normalize_context(None) == () and normalize_context("one doc") == (
        ContextItem("document", "one doc"),
    )


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"type": "document", "content": "x"}, "must be a list"),
        ([{"type": "memo", "content": "x"}], "has type 'memo'"),
        ([{"type": "document", "content": 3}], "content must be a str"),
        ([{"type": "document", "content": "x", "name": 3}], "name must be a str"),
        ([3], "must be a str or a"),
        (["\ud800"], "lone surrogate"),
    ],
)
def test_bad_context_is_a_clear_input_error(bad, match):
    with pytest.raises(InvalidInputError, match=match):
        normalize_context(bad)


def test_records_carry_context_as_a_list_or_a_json_string():
    assert context_of({"context": TOOL_TURN}) == TOOL_TURN
    assert context_of({"context": '[{"type": "document", "content": "x"}]'}) == [
        {"type": "document", "content": "x"}
    ]
    assert context_of({"context": "plain text"}) == "plain text"
    assert context_of({"context": ""}) is None and context_of({}) is None


def test_official_templates_fold_the_context_after_the_history_and_stay_byte_exact_without():
    template = get_template("aligner-v1")
    assert render_prompt(template, Q, A, (), ()) == template.format(question=Q, answer=A)
    history = (("user", "I am in Paris."), ("assistant", "Nice!"))
    assert render_prompt(template, Q, A, history) == template.format(
        question=fold_history(Q, history), answer=A
    )
    prompt = render_prompt(template, Q, A, history, normalize_context(TOOL_TURN))
    assert prompt == template.format(
        question="Earlier in this conversation:\nUser: I am in Paris.\nAssistant: Nice!\n\n"
        'The answer may rely on:\nTool call (get_weather): {"city": "Paris"}\nTool result (get_weather): sunny, 21C'
        f"\n\nQuestion: {Q}",
        answer=A,
    )


def test_the_history_template_keeps_its_slot_and_folds_the_context_into_the_question():
    template = get_template("aligner-chat-history")
    prompt = render_prompt(template, Q, A, (("user", "hi"),), normalize_context(["doc"]))
    assert prompt.startswith(
        "BEGINNING OF CONVERSATION: USER: ##History:\nUser: hi\n##Question: The answer may rely on:"
    )
    assert f"Document: doc\n\nQuestion: {Q}\n##Answer: {A}" in prompt


def test_the_chat_template_gets_real_turns(tiny_tokenizer):
    template = get_template("chat", tokenizer=tiny_tokenizer)
    context = normalize_context([*TOOL_TURN, "Paris is in France."])
    assert context_messages(context) == [
        {"role": "system", "content": "The answer may rely on:\nDocument: Paris is in France."},
        {"role": "assistant", "content": 'Tool call (get_weather): {"city": "Paris"}'},
        {"role": "tool", "content": "sunny, 21C"},
    ]
    messages = template.messages(question=Q, answer=A, history=(("user", "hi"),), context=context)
    assert [m["role"] for m in messages] == ["user", "system", "assistant", "tool", "user"]
    assert "<|tool|>sunny, 21C" in render_prompt(template, Q, A, (), context)


def test_a_chat_template_that_refuses_the_turns_says_what_to_do(tiny_tokenizer):
    from copy import deepcopy

    strict = deepcopy(tiny_tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}"
        "{{ raise_exception('unknown role') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    template = get_template("chat", tokenizer=strict)
    from aligner_core import TemplateError

    with pytest.raises(TemplateError, match="cannot render the grounding context as turns"):
        render_prompt(template, Q, A, (), normalize_context(TOOL_TURN))
    assert render_prompt(template, Q, A)  # without context it renders as before


def test_every_entry_point_takes_context_and_records_it(tiny_aligner):
    fix = tiny_aligner.correct(Q, A, context=TOOL_TURN)
    assert fix.metadata["context_items"] == 2 and fix.metadata["context_tokens"] > 10
    assert "context_trimmed" not in fix.metadata
    plain = tiny_aligner.correct(Q, A)
    assert (
        "context_items" not in plain.metadata
        and fix.prompt_tokens == plain.prompt_tokens + fix.metadata["context_tokens"]
    )
    batch = tiny_aligner.correct_batch([{"question": Q, "answer": A, "context": TOOL_TURN}, (Q, A)])
    assert batch[0].metadata["context_items"] == 2 and batch[0].prompt_tokens == fix.prompt_tokens
    assert "context_items" not in batch[1].metadata
    stream = tiny_aligner.stream(Q, A, context=TOOL_TURN)
    assert "".join(stream) == stream.correction.text and stream.correction.prompt_tokens == fix.prompt_tokens

    async def run() -> tuple[int, int]:
        one = await tiny_aligner.acorrect(Q, A, context=TOOL_TURN)
        streamed = tiny_aligner.astream(Q, A, context=TOOL_TURN)
        async for _ in streamed:
            pass
        return one.prompt_tokens, streamed.correction.prompt_tokens

    import asyncio

    assert asyncio.run(run()) == (fix.prompt_tokens, fix.prompt_tokens)


def test_the_context_gives_way_first_when_the_prompt_is_too_long(tiny_model, tiny_tokenizer):
    aligner = Aligner.from_model(tiny_model, tiny_tokenizer, template="aligner-v1", max_new_tokens=8)
    docs = [f"Document number {i} says spiders have eight legs." for i in range(60)]
    fix = aligner.correct("How many legs?", "Eight.", context=docs, max_new_tokens=64)
    kept, trimmed = fix.metadata["context_items"], fix.metadata["context_trimmed"]
    assert 0 < kept < 60 and kept + trimmed == 60
    assert fix.prompt_tokens + 64 <= 512 and "truncated" not in fix.metadata
    one_more = aligner.prepare(
        "How many legs?", "Eight.", aligner.defaults, max_new_tokens=64, context=docs[60 - kept - 1 :]
    )
    assert (
        one_more.metadata["context_trimmed"] == 1
    )  # the first (farthest) item went, and one more did not fit
    assert aligner.correct("How many legs?", "Eight.", context=docs[-2:]).metadata["context_items"] == 2


def test_the_inspector_sees_the_context(tiny_aligner):
    seen: list[str] = []

    def inspector(question: str, answer: str) -> float:
        seen.append(question)
        return 1.0

    kept = tiny_aligner.correct(Q, A, context=TOOL_TURN, inspector=inspector)
    assert kept.metadata["skipped"] == "inspector_passed" and kept.question == Q
    tiny_aligner.correct_batch([{"question": Q, "answer": A, "context": TOOL_TURN}], inspector=inspector)
    stream = tiny_aligner.stream(Q, A, context=TOOL_TURN, inspector=inspector)
    assert "".join(stream) == A
    assert len(seen) == 3 and all(
        "Tool result (get_weather): sunny, 21C" in q and q.endswith(Q) for q in seen
    )


def test_file_jobs_read_context_from_jsonl_and_csv(tiny_aligner, tmp_path):
    import csv
    import json

    from aligner_core.jobs.files import correct_jsonl

    rows = [
        {"question": Q, "answer": A, "context": TOOL_TURN},
        {"question": Q, "answer": A},
        {"question": Q, "answer": A, "context": [{"type": "memo", "content": "x"}]},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    stats = correct_jsonl(tiny_aligner, src, out, show_progress=False, max_new_tokens=4)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert stats.written == 3 and stats.failed == 1
    assert lines[0]["aligner"]["metadata"]["context_items"] == 2 and lines[0]["context"] == TOOL_TURN
    assert "context_items" not in lines[1]["aligner"]["metadata"]
    assert "has type 'memo'" in lines[2]["aligner_error"]["message"]
    table = tmp_path / "in.csv"  # CSV carries a list of items as JSON text, or one document as plain text
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer", "context"])
        writer.writeheader()
        writer.writerow({"question": Q, "answer": A, "context": json.dumps(TOOL_TURN)})
        writer.writerow({"question": Q, "answer": A, "context": "Paris is in France."})
    out_csv = tmp_path / "out-csv.jsonl"
    correct_jsonl(tiny_aligner, table, out_csv, show_progress=False, max_new_tokens=4)
    assert [
        json.loads(x)["aligner"]["metadata"]["context_items"] for x in out_csv.read_text().splitlines()
    ] == [2, 1]
