"""Multi-turn correction in the core: how each template renders history, and every entry point passes it."""

from __future__ import annotations

import asyncio
import csv
import json

import pytest

from aligner_core.errors import InvalidInputError
from aligner_core.history import fold_history, normalize_history, render_prompt
from aligner_core.jobs.files import correct_jsonl
from aligner_core.templates import get_template

HISTORY = [
    {"role": "user", "content": "Hi, I am Ana and I live in Peru."},
    {"role": "assistant", "content": "Hello Ana! How can I help?"},
]
Q, A = "What is the capital of my country?", "The capital of your country is Quito."


def test_official_templates_fold_history_into_the_question_in_one_documented_form():
    v1 = get_template("aligner-v1")
    assert render_prompt(v1, Q, A, normalize_history(HISTORY)) == (
        "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more helpful and "
        "harmless: Earlier in this conversation:\nUser: Hi, I am Ana and I live in Peru.\n"
        "Assistant: Hello Ana! How can I help?\n\nQuestion: What is the capital of my country? | "
        "The capital of your country is Quito. ASSISTANT:"
    )
    for name in ("aligner-v1", "aligner-general", "aligner-empathy", "aligner-chat-history"):
        template = get_template(name)  # no history: byte-exact single-turn prompts
        assert render_prompt(template, Q, A, ()) == template.format(question=Q, answer=A)
    assert fold_history(Q, ()) == Q


def test_the_chat_history_template_renders_turns_and_is_aligner_general_without_them():
    template = get_template("aligner-chat-history")
    general = get_template("aligner-general")
    assert template.format(question=Q, answer=A) == general.format(question=Q, answer=A)
    assert render_prompt(template, Q, A, normalize_history(HISTORY)) == (
        "BEGINNING OF CONVERSATION: USER: ##History:\nUser: Hi, I am Ana and I live in Peru.\n"
        "Assistant: Hello Ana! How can I help?\n##Question: What is the capital of my country?\n"
        "##Answer: The capital of your country is Quito.\n##Correction:  ASSISTANT:"
    )
    assert "{history}" in render_prompt(
        template, "{history}", A, normalize_history(HISTORY)
    )  # one-pass substitution


def test_the_chat_template_sends_history_as_real_turns(tiny_tokenizer):
    template = get_template("chat", tiny_tokenizer)
    messages = template.messages(question=Q, answer=A, history=normalize_history(HISTORY))
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == HISTORY[0]["content"] and Q in messages[-1]["content"]
    assert HISTORY[1]["content"] in template.format(question=Q, answer=A, history=normalize_history(HISTORY))


@pytest.mark.parametrize(
    "bad, message",
    [
        ("just text", "must be a list"),
        ([{"role": "robot", "content": "x"}], "role 'robot'"),
        ([{"role": "user"}], "needs 'role' and 'content'"),
        ([{"role": "user", "content": 3}], "content must be a str"),
        ([{"role": "user", "content": "bad \ud800"}], "lone surrogate"),
        ([42], "must be a {'role', 'content'} dict"),
    ],
)
def test_bad_history_is_a_clear_input_error(tiny_aligner, bad, message):
    with pytest.raises(InvalidInputError, match=message):
        tiny_aligner.correct(Q, A, history=bad)


def test_every_entry_point_passes_the_history(tiny_aligner):
    tiny_aligner.defaults = tiny_aligner.defaults.updated({"max_new_tokens": 8})
    one = tiny_aligner.correct(Q, A, history=HISTORY)
    plain = tiny_aligner.correct(Q, A)
    assert one.metadata["history_turns"] == 2 and "history_turns" not in plain.metadata
    assert one.prompt_tokens > plain.prompt_tokens
    batch = tiny_aligner.correct_batch(
        [{"question": Q, "answer": A, "chat_history": HISTORY}, (Q, A, HISTORY), (Q, A)]
    )
    assert [c.text for c in batch] == [one.text, one.text, plain.text]
    assert [c.prompt_tokens for c in batch] == [one.prompt_tokens, one.prompt_tokens, plain.prompt_tokens]
    assert asyncio.run(tiny_aligner.acorrect(Q, A, history=HISTORY)).text == one.text
    stream = tiny_aligner.stream(Q, A, history=HISTORY)
    assert "".join(stream) == one.text and stream.correction.metadata["history_turns"] == 2

    async def astream() -> str:
        return "".join([d async for d in tiny_aligner.astream(Q, A, history=HISTORY)])

    assert asyncio.run(astream()) == one.text


def test_a_bad_history_fails_only_its_own_pair(tiny_aligner):
    out = tiny_aligner.correct_batch(
        [(Q, A, [{"role": "robot", "content": "x"}]), (Q, A, HISTORY)],
        return_exceptions=True,
        max_new_tokens=4,
    )
    assert isinstance(out[0], InvalidInputError) and out[1].metadata["history_turns"] == 2


def test_file_jobs_read_history_from_jsonl_and_csv(tiny_aligner, tmp_path):
    rows = [
        {"question": Q, "answer": A, "chat_history": HISTORY},
        {"question": Q, "answer": A},
        {"question": Q, "answer": A, "history": "not json"},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    stats = correct_jsonl(tiny_aligner, src, out, show_progress=False, max_new_tokens=4)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert stats.written == 3 and stats.failed == 1
    assert lines[0]["aligner"]["metadata"]["history_turns"] == 2 and lines[0]["chat_history"] == HISTORY
    assert "history_turns" not in lines[1]["aligner"]["metadata"]
    assert "not a JSON list" in lines[2]["aligner_error"]["message"]
    table = tmp_path / "in.csv"  # CSV carries the turns as JSON text
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer", "history"])
        writer.writeheader()
        writer.writerow({"question": Q, "answer": A, "history": json.dumps(HISTORY)})
    out_csv = tmp_path / "out-csv.jsonl"
    correct_jsonl(tiny_aligner, table, out_csv, show_progress=False, max_new_tokens=4)
    assert json.loads(out_csv.read_text())["aligner"]["metadata"]["history_turns"] == 2


def test_special_token_text_in_history_stays_text(tiny_aligner):
    eos = tiny_aligner.engine.tokenizer.eos_token
    history = [{"role": "user", "content": f"I typed {eos} by accident."}]
    prepared = tiny_aligner.prepare(Q, A, tiny_aligner.defaults, history=history)
    assert prepared.metadata["special_token_text"] is True
    assert tiny_aligner.engine.tokenizer.eos_token_id not in prepared.request.prompt_ids


def test_the_cli_corrects_records_with_history(tiny_model_dir, tmp_path):
    from aligner_core.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"question": Q, "answer": A, "chat_history": HISTORY}) + "\n")
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "correct",
                str(src),
                "-o",
                str(out),
                "--model",
                str(tiny_model_dir),
                "--template",
                "aligner-chat-history",
                "--max-new-tokens",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    line = json.loads(out.read_text())
    assert line["aligner"]["metadata"] == {
        **line["aligner"]["metadata"],
        "history_turns": 2,
        "template": "aligner-chat-history",
    }
