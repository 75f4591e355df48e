"""Tokenization for training: exact prompt, label mask on the prompt, correction + EOS, overlong policies."""

from __future__ import annotations

import pytest

from aligner_core import TemplateError, get_template
from aligner_core.training import IGNORE_INDEX, ExampleEncoder, Record, TrainingDataError
from aligner_core.training.collate import CorrectionCollator
from aligner_core.training.encode import encode_records
from tests.conftest import build_tokenizer

Q, A, C = (
    "What is the capital of Australia?",
    "The capital is Sydney.",
    "The capital of Australia is Canberra.",
)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


@pytest.mark.parametrize("name", ["aligner-v1", "aligner-general", "chat"])
def test_prompt_tokens_carry_minus_100_and_correction_plus_eos_do_not(tokenizer, name):
    template = get_template(name, tokenizer=tokenizer)
    ex = ExampleEncoder(tokenizer, template).encode(Q, A, C)
    prompt = tokenizer(template.format(question=Q, answer=A), add_special_tokens=template.add_special_tokens)[
        "input_ids"
    ]
    correction = tokenizer(C, add_special_tokens=False)["input_ids"]

    assert ex.prompt_length == len(prompt)
    assert ex.input_ids == [*prompt, *correction, tokenizer.eos_token_id]  # ids concatenated at the seam
    assert ex.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ex.labels[len(prompt) :] == [*correction, tokenizer.eos_token_id]
    assert IGNORE_INDEX not in ex.labels[len(prompt) :]
    assert ex.labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.labels[len(prompt) : -1]) == C


def test_prompt_is_what_inference_feeds_the_model(tokenizer, tiny_aligner):
    """Same template string and the same BOS convention as ``Aligner.prepare``."""
    encoder = ExampleEncoder(tokenizer, tiny_aligner.template)
    prepared = tiny_aligner.prepare(Q, A, tiny_aligner.defaults)
    assert encoder.prompt(Q, A) == prepared.request.prompt
    assert encoder.encode(Q, A, C).input_ids[: encoder.encode(Q, A, C).prompt_length] == list(
        prepared.request.prompt_ids
    )
    assert (
        encoder.encode(Q, A, C).input_ids[0] == tokenizer.bos_token_id
    )  # aligner-v1 adds BOS, as inference does


GROUNDING = [
    {"type": "tool_call", "name": "lookup", "content": {"country": "Australia"}},
    {"type": "tool_result", "name": "lookup", "content": "capital: Canberra"},
    "Canberra is in the ACT.",
]


@pytest.mark.parametrize("name", ["aligner-v1", "aligner-chat-history", "chat"])
def test_context_is_encoded_with_the_ids_inference_uses(tokenizer, tiny_model, name, tmp_path):
    """A record's ``context`` field trains on exactly the prompt ids ``Aligner.prepare`` generates from."""
    import json

    from aligner_core import Aligner
    from aligner_core.training.data import load_records

    data = tmp_path / "train.jsonl"
    record = {
        "question": Q,
        "answer": A,
        "correction": C,
        "context": GROUNDING,
        "chat_history": [{"role": "user", "content": "I am planning a trip <s> soon."}],
    }
    data.write_text(
        json.dumps(record) + "\n" + json.dumps({**record, "context": json.dumps(GROUNDING)}) + "\n"
    )
    loaded = load_records(str(data))
    assert loaded[0].context == loaded[1].context and len(loaded[0].context) == 3
    aligner = Aligner.from_model(tiny_model, tokenizer, template=name, max_new_tokens=4)
    encoder = ExampleEncoder(tokenizer, aligner.template)
    prepared = aligner.prepare(Q, A, aligner.defaults, history=record["chat_history"], context=GROUNDING)
    assert prepared.metadata["special_token_text"] and prepared.metadata["context_items"] == 3
    for example in (
        encoder.encode_many(loaded)[0],
        encoder.encode(Q, A, C, "", loaded[0].history, loaded[0].context),
    ):
        assert example.input_ids[: example.prompt_length] == list(prepared.request.prompt_ids)


def test_bad_context_in_training_data_names_the_record(tmp_path):
    import json

    from aligner_core.training.data import load_records

    data = tmp_path / "train.jsonl"
    data.write_text(
        json.dumps(
            {"question": Q, "answer": A, "correction": C, "context": [{"type": "memo", "content": "x"}]}
        )
    )
    with pytest.raises(TrainingDataError, match="line 1.*context item 0 has type 'memo'"):
        load_records(str(data))


def test_v1_correction_follows_assistant_colon_directly(tokenizer):
    encoder = ExampleEncoder(tokenizer, get_template("aligner-v1"))
    ex = encoder.encode(Q, A, C)
    text = tokenizer.decode(ex.input_ids, skip_special_tokens=True)
    assert text.endswith(f"{A} ASSISTANT:{C}")


def test_batched_encoding_equals_one_by_one(tokenizer):
    encoder = ExampleEncoder(tokenizer, get_template("aligner-general"))
    records = [Record(Q, A, C, "record 0"), Record("Q2?", "A {answer} | x", "Fixed {question}.", "record 1")]
    batched = encoder.encode_many(records)
    assert [(e.input_ids, e.labels) for e in batched] == [
        (e.input_ids, e.labels) for e in (encoder.encode(r.question, r.answer, r.correction) for r in records)
    ]


def test_tokenizer_without_eos_is_refused(tokenizer):
    broken = build_tokenizer()
    broken.eos_token = None
    with pytest.raises(TemplateError, match="no EOS token"):
        ExampleEncoder(broken, get_template("aligner-v1"))


def test_template_the_tokenizer_cannot_encode_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, "What": 2, "is": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    with pytest.raises(TemplateError, match="cannot encode template 'aligner-v1'.*unknown token"):
        ExampleEncoder(fast, get_template("aligner-v1")).check_template()


def test_chat_template_needs_a_chat_tokenizer():
    with pytest.raises(TemplateError, match="chat template"):
        get_template("chat", tokenizer=build_tokenizer(chat=False))


def test_overlong_records_error_lists_them(tokenizer):
    encoder = ExampleEncoder(tokenizer, get_template("aligner-v1"))
    records = [Record(Q, A, C, "line 1"), Record(Q, A, C * 20, "line 2"), Record(Q, A * 30, C, "line 3")]
    with pytest.raises(TrainingDataError) as info:
        encode_records(encoder, records, max_length=150, policy="error")
    message = str(info.value)
    assert "2 of 3 records are longer than max_length=150" in message
    assert "line 2:" in message and "line 3:" in message and "line 1:" not in message
    assert "--overlong" in message


def test_overlong_drop_and_truncate(tokenizer):
    encoder = ExampleEncoder(tokenizer, get_template("aligner-v1"))
    records = [Record(Q, A, C, "line 1"), Record(Q, A, C * 20, "line 2"), Record(Q, A * 30, C, "line 3")]
    kept, report = encode_records(encoder, records, max_length=150, policy="drop")
    assert [e.where for e in kept] == ["line 1"] and (report.overlong, report.dropped, report.truncated) == (
        2,
        2,
        0,
    )

    kept, report = encode_records(encoder, records, max_length=150, policy="truncate")
    # line 2 keeps its prompt and the head of its correction; line 3's prompt alone is too long.
    assert [e.where for e in kept] == ["line 1", "line 2"]
    assert (report.overlong, report.dropped, report.truncated) == (2, 1, 1)
    cut = kept[1]
    assert len(cut.input_ids) == 150 and cut.labels[: cut.prompt_length] == [IGNORE_INDEX] * cut.prompt_length
    assert cut.input_ids[-1] != tokenizer.eos_token_id


def test_collator_pads_right_and_masks_padding():
    collate = CorrectionCollator(pad_token_id=2)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    wide = CorrectionCollator(pad_token_id=0, pad_to_multiple_of=8)(
        [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}]
    )
    assert wide["input_ids"].shape == (1, 8)
