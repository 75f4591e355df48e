import pytest

from aligner_core import (
    Aligner,
    ContextOverflowError,
    EmptyAnswerError,
    GenerationOptionError,
    InvalidInputError,
)


@pytest.mark.parametrize("answer", ["", "   ", "\n\t"])
def test_empty_answer(tiny_aligner, answer):
    with pytest.raises(EmptyAnswerError, match="nothing to correct"):
        tiny_aligner.correct("q", answer)


@pytest.mark.parametrize(
    ("question", "answer", "field"), [(None, "a", "question"), ("q", 3, "answer"), ("q", b"a", "answer")]
)
def test_non_string_input(tiny_aligner, question, answer, field):
    with pytest.raises(InvalidInputError, match=f"{field} must be a str"):
        tiny_aligner.correct(question, answer)


def test_malformed_pairs(tiny_aligner):
    with pytest.raises(InvalidInputError, match="sequence of"):
        tiny_aligner.correct_batch("not pairs")
    with pytest.raises(InvalidInputError, match="pair 1"):
        tiny_aligner.correct_batch([("q", "a"), ("only one",)])
    with pytest.raises(InvalidInputError, match="'question' and 'answer'"):
        tiny_aligner.correct_batch([{"q": "x"}])
    with pytest.raises(InvalidInputError, match="2 entries for 1 pairs"):
        tiny_aligner.correct_batch([("q", "a")], max_new_tokens=[1, 2])


def test_dict_pairs_are_accepted(tiny_aligner):
    out = tiny_aligner.correct_batch([{"question": "q", "answer": "a b c"}])
    assert out[0].original == "a b c"


def test_unknown_generation_option(tiny_aligner):
    with pytest.raises(GenerationOptionError, match="temprature"):
        tiny_aligner.correct("q", "a", temprature=0.5)


def test_batch_validates_everything_before_any_compute(tiny_aligner, tiny_model):
    forwards: list[
        int
    ] = []  # every forward pass of the model, whatever path decodes (drafting loop or generate)
    hook = tiny_model.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        with pytest.raises(EmptyAnswerError, match="pair 2"):
            tiny_aligner.correct_batch([("q", "fine"), ("q", "also fine"), ("q", " ")])
        assert forwards == []  # refused before any compute
        tiny_aligner.correct_batch([("q", "fine")])
        assert forwards  # the same spy sees a valid batch's compute: it can fail
    finally:
        hook.remove()


def test_return_exceptions_keeps_the_good_items(tiny_aligner):
    pairs = [("q1", "good one"), ("q2", ""), ("q3", 7), ("q4", "another good one")]
    out = tiny_aligner.correct_batch(pairs, return_exceptions=True)
    assert isinstance(out[1], EmptyAnswerError)
    assert isinstance(out[2], InvalidInputError)
    assert [out[0].question, out[3].question] == ["q1", "q4"]
    assert out[0].text == tiny_aligner.correct("q1", "good one").text


def test_context_overflow_error_and_truncate_policy(tiny_model, tiny_tokenizer):
    from tests.conftest import build_model

    model = build_model(tiny_tokenizer, context=128)
    aligner = Aligner.from_model(model, tiny_tokenizer, template="aligner-v1", max_new_tokens=16)
    long_answer = "Spiders have eight legs. " * 40
    with pytest.raises(ContextOverflowError, match="on_overflow='truncate'"):
        aligner.correct("How many legs?", long_answer)
    c = aligner.correct("How many legs?", long_answer, on_overflow="truncate")
    assert c.prompt_tokens + 16 <= 128
    assert c.original == long_answer  # the caller's answer is reported whole
    assert c.metadata["truncated"] is True and c.metadata["answer_tokens_kept"] < c.metadata["answer_tokens"]
    with pytest.raises(ContextOverflowError, match="lower max_new_tokens"):
        aligner.correct("How many legs?", long_answer, on_overflow="truncate", max_new_tokens=127)
    truncating = Aligner.from_model(
        model, tiny_tokenizer, template="aligner-v1", max_new_tokens=16, on_overflow="truncate"
    )
    assert truncating.correct("How many legs?", long_answer).metadata["truncated"] is True
    with pytest.raises(ValueError, match="on_overflow"):
        Aligner.from_model(model, tiny_tokenizer, template="aligner-v1", on_overflow="drop")  # type: ignore[arg-type]
