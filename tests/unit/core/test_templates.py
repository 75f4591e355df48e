import pytest

from aligner_core import (
    ChatTemplate,
    TemplateError,
    TextTemplate,
    get_template,
    list_templates,
    register_template,
)

V1 = (
    "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more helpful and "
    "harmless: {q} | {a} ASSISTANT:"
)


def test_v1_is_byte_exact():
    got = get_template("aligner-v1").format(question="How do I cook rice?", answer="Boil it.")
    assert got == V1.format(q="How do I cook rice?", a="Boil it.")
    assert got.endswith("ASSISTANT:")  # no trailing space: the correction follows directly


def test_general_is_byte_exact_with_two_spaces_before_assistant():
    got = get_template("aligner-general").format(question="Q?", answer="A.")
    assert got == "BEGINNING OF CONVERSATION: USER: ##Question: Q?\n##Answer: A.\n##Correction:  ASSISTANT:"


def test_empathy_variant():
    got = get_template("aligner-empathy").format(question="Q", answer="A")
    assert got == (
        "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more empathic and "
        "helpful: Q | A ASSISTANT:"
    )


def test_user_text_is_substituted_once_and_braces_need_no_escaping():
    got = get_template("aligner-v1").format(question="say {answer} {0} {x}", answer="{question}")
    assert "say {answer} {0} {x} | {question} ASSISTANT:" in got


def test_unknown_template_lists_known_ones():
    with pytest.raises(TemplateError, match="aligner-v1"):
        get_template("nope")


def test_register_custom_template_and_overwrite_guard():
    t = TextTemplate("test-custom", "Q: {question}\nA: {answer}\nFixed:")
    register_template(t, overwrite=True)
    assert "test-custom" in list_templates()
    assert get_template("test-custom").format(question="a", answer="b") == "Q: a\nA: b\nFixed:"
    with pytest.raises(TemplateError, match="overwrite=True"):
        register_template(t)


def test_text_template_requires_both_fields():
    with pytest.raises(TemplateError, match="answer"):
        TextTemplate("bad", "only {question}")


def test_chat_template_renders_tokenizer_chat_format(tiny_tokenizer):
    t = get_template("chat", tokenizer=tiny_tokenizer)
    got = t.format(question="Why?", answer="Because.")
    assert got.startswith("<|user|>Edit the following Question-Answer pair")
    assert "Question: Why?\nAnswer: Because." in got
    assert got.endswith("<|assistant|>")
    assert t.add_special_tokens is False


def test_chat_template_needs_a_bound_tokenizer():
    with pytest.raises(TemplateError, match="bind"):
        get_template("chat").format(question="q", answer="a")


def test_chat_template_rejects_tokenizer_without_chat_template():
    from tests.conftest import build_tokenizer

    with pytest.raises(TemplateError, match="no chat template|has none"):
        ChatTemplate().bind(build_tokenizer(chat=False))
