import dataclasses

import pytest

from aligner_core import Correction, GenerationOptionError, GenerationParams, similarity


def test_build_derives_changed_and_similarity():
    c = Correction.build(
        question="q",
        original="The sky is green.",
        text="The sky is blue.",
        prompt_tokens=10,
        completion_tokens=5,
        finish_reason="stop",
        latency_s=0.1,
    )
    assert c.changed is True
    assert 0.5 < c.similarity < 1.0
    same = dataclasses.replace(c, text="x")
    assert same.text == "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.text = "y"  # type: ignore[misc]


def test_whitespace_only_difference_is_not_a_change():
    c = Correction.build(
        question="q",
        original="Fine answer. ",
        text="Fine answer.",
        prompt_tokens=1,
        completion_tokens=1,
        finish_reason="stop",
        latency_s=0.0,
    )
    assert c.changed is False
    assert c.similarity == 1.0


def test_similarity_bounds():
    assert similarity("abc", "abc") == 1.0
    assert similarity("abc", "xyz") == 0.0


def test_to_dict_is_json_ready():
    import json

    c = Correction.build(
        question="q",
        original="a",
        text="b",
        prompt_tokens=1,
        completion_tokens=2,
        finish_reason="length",
        latency_s=0.5,
        metadata={"template": "chat"},
    )
    d = json.loads(json.dumps(c.to_dict()))
    assert d["finish_reason"] == "length" and d["metadata"] == {"template": "chat"}


def test_generation_params_validation():
    p = GenerationParams()
    assert p.do_sample is False  # greedy by default
    assert p.updated({"stop": "###"}).stop == ("###",)
    with pytest.raises(GenerationOptionError, match="max_new_tokns"):
        p.updated({"max_new_tokns": 3})
    with pytest.raises(GenerationOptionError, match="max_new_tokens must be a positive integer, got 0"):
        p.updated({"max_new_tokens": 0})
    with pytest.raises(GenerationOptionError, match="top_p"):
        p.updated({"top_p": 1.5})
    with pytest.raises(GenerationOptionError, match="temperature"):
        p.updated({"temperature": 0, "do_sample": True})
    assert p.updated({"temperature": 0}).temperature == 0  # greedy ignores it
