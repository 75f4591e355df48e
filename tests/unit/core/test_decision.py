"""The core's one decision of what gets corrected (aligner_core.decision)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from pydantic import BaseModel

from aligner_core import Correction, Reply, Skip, Structure, UnreadableContentError, decide, step
from aligner_core.decision import DETAILS, current_step, passed, read_content


def correction(text: str, original: str = '{"city": "Paris"}') -> Correction:
    return Correction.build(
        question="q",
        original=original,
        text=text,
        prompt_tokens=3,
        completion_tokens=2,
        finish_reason="stop",
        latency_s=0.1,
        metadata={"template": "t"},
    )


def test_a_final_text_answer_is_corrected():
    decision = decide(Reply(content="It is sunny and 21C in Paris."))
    assert (
        decision.corrects and decision.text == "It is sunny and 21C in Paris." and decision.metadata() == {}
    )


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (Reply(content="Let me check.", tool_calls=True), Skip.TOOL_CALLS),
        (Reply(content=None, tool_calls=True), Skip.TOOL_CALLS),
        (Reply(content=None, refusal="I can't help with that."), Skip.REFUSAL),
        (Reply(content=[{"type": "refusal", "refusal": "No."}]), Skip.REFUSAL),
        (Reply(content='{"a": 1}', structure=Structure("json")), Skip.STRUCTURED_OUTPUT),
        (Reply(content=""), Skip.EMPTY_ANSWER),
        (Reply(content="   \n"), Skip.EMPTY_ANSWER),
        (Reply(content=None), Skip.EMPTY_ANSWER),
        (Reply(content=[{"type": "image_url", "image_url": {"url": "data:,"}}]), Skip.NON_TEXT_CONTENT),
        (Reply(content="What is its capital?", step="intermediate"), Skip.INTERMEDIATE_STEP),
    ],
)
def test_what_passes_through_and_why(reply, reason):
    decision = decide(reply)
    assert not decision.corrects and decision.skip is reason
    meta = decision.metadata()
    assert meta["skipped"] == reason.value and meta["skipped_detail"] == DETAILS[reason]
    kept = decision.passthrough("q", {"template": "t"})
    assert (kept.text, kept.original, kept.changed, kept.completion_tokens) == (
        decision.text,
        decision.text,
        False,
        0,
    )
    assert kept.metadata["skipped"] == reason.value and kept.metadata["template"] == "t"


def test_text_parts_are_corrected_as_their_text_and_other_parts_are_counted():
    parts = [
        {"type": "text", "text": "It is "},
        "sunny",
        {"type": "output_text", "text": "."},
        {"type": "image_url", "image_url": {"url": "data:,"}},
        {"type": "reasoning", "summary": []},
    ]
    decision = decide(Reply(content=parts))
    assert (
        decision.corrects and decision.text == "It is sunny." and decision.metadata() == {"non_text_parts": 2}
    )


@pytest.mark.parametrize(
    "content",
    [
        12345,
        1.5,
        {"text": "a dict"},
        b"bytes",
        [{"type": "mystery", "text": "x"}],
        [{"text": "no type"}],
        [42],
        [{"type": "text", "text": 7}],
    ],
)
def test_content_the_aligner_cannot_read_fails_closed(content):
    with pytest.raises(UnreadableContentError, match="cannot read"):
        decide(Reply(content=content))
    with pytest.raises(UnreadableContentError):
        read_content(content)


def test_unreadable_content_of_a_tool_call_or_intermediate_step_passes_as_what_it_is():
    assert decide(Reply(content=12345, tool_calls=True)).skip is Skip.TOOL_CALLS
    assert decide(Reply(content=12345, step="intermediate")).skip is Skip.INTERMEDIATE_STEP


def test_the_step_marker_overrides_the_adapter_and_nests():
    assert current_step() is None
    with step("intermediate"):
        assert decide(Reply(content="x")).skip is Skip.INTERMEDIATE_STEP
        with step("final"):
            assert decide(Reply(content="x", step="intermediate")).corrects
        assert current_step() == "intermediate"
    assert current_step() is None
    with pytest.raises(ValueError, match="'final' or 'intermediate'"), step("maybe"):  # type: ignore[arg-type]
        pass


def test_the_step_marker_reaches_tasks_and_copied_contexts_but_not_other_threads():
    import contextvars

    async def inside() -> Skip | None:
        return decide(Reply(content="x")).skip

    async def main() -> tuple[Skip | None, Skip | None]:
        with step("intermediate"):
            marked = await asyncio.create_task(inside())
        return marked, await asyncio.create_task(inside())

    assert asyncio.run(main()) == (Skip.INTERMEDIATE_STEP, None)
    seen: list[Skip | None] = []
    with step("intermediate"):
        ctx = contextvars.copy_context()
        bare = threading.Thread(target=lambda: seen.append(decide(Reply(content="x")).skip))
        bare.start()
        bare.join()
        copied = threading.Thread(
            target=lambda: seen.append(ctx.run(lambda: decide(Reply(content="x")).skip))
        )
        copied.start()
        copied.join()
    assert seen == [None, Skip.INTERMEDIATE_STEP]


class City(BaseModel):
    city: str
    temperature_c: int


SCHEMA = City.model_json_schema()


def test_structured_output_opt_in_keeps_a_correction_that_validates():
    decision = decide(
        Reply(content='{"city": "paris", "temperature_c": 21}', structure=Structure("json_schema", SCHEMA)),
        correct_structured=True,
    )
    assert decision.corrects and decision.metadata() == {"structured": "json_schema"}
    kept = decision.settle(correction(' {"city": "Paris", "temperature_c": 21}\n'))
    assert kept.text == '{"city": "Paris", "temperature_c": 21}' and kept.changed
    assert kept.metadata["structured"] == "json_schema" and "skipped" not in kept.metadata
    assert City.model_validate_json(kept.text).city == "Paris"


@pytest.mark.parametrize(
    ("structure", "text", "why"),
    [
        (Structure("json"), "Sure! The city is Paris.", "not JSON"),
        (Structure("json_schema", SCHEMA), '{"city": "Paris"}', "does not match the schema"),
        (
            Structure("json_schema", SCHEMA),
            '{"city": "Paris", "temperature_c": "warm"}',
            "does not match the schema",
        ),
        (Structure("json", validator=City.model_validate), '{"city": 3}', "does not validate"),
    ],
)
def test_structured_output_opt_in_returns_the_original_when_the_correction_breaks_it(structure, text, why):
    original = '{"city": "Paris", "temperature_c": 21}'
    decision = decide(Reply(content=original, structure=structure), correct_structured=True)
    kept = decision.settle(correction(text, original))
    assert kept.text == original and not kept.changed and kept.similarity == 1.0
    assert kept.metadata["skipped"] == "structured_output_invalid" and why in kept.metadata["invalid_reason"]
    assert kept.metadata["invalid_correction"] == text
    json.loads(kept.text)  # what the caller parses still parses


def test_settle_leaves_prose_corrections_alone():
    decision = decide(Reply(content="Sydney is the capital."))
    fixed = correction("Canberra is the capital.", "Sydney is the capital.")
    assert decision.settle(fixed) is fixed


def test_passed_is_an_unchanged_correction():
    kept = passed("q", "a", {"skipped": "tool_calls"})
    assert (kept.text, kept.original, kept.changed, kept.similarity, kept.prompt_tokens) == (
        "a",
        "a",
        False,
        1.0,
        0,
    )
    assert str(Skip.TOOL_CALLS) == "tool_calls"


def test_a_structure_may_read_json_the_way_its_framework_does():
    import re

    def fenced(text: str) -> object:
        match = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
        return json.loads(match.group(1) if match else text)

    original = '{"city": "paris", "temperature_c": 21}'
    decision = decide(
        Reply(content=original, structure=Structure("json_schema", SCHEMA, parser=fenced)),
        correct_structured=True,
    )
    kept = decision.settle(
        correction('Here it is:\n```json\n{"city": "Paris", "temperature_c": 21}\n```', original)
    )
    assert "skipped" not in kept.metadata and kept.changed
    strict = decide(
        Reply(content=original, structure=Structure("json_schema", SCHEMA)), correct_structured=True
    )
    assert (
        strict.settle(correction('```json\n{"city": "Paris", "temperature_c": 21}\n```', original)).text
        == original
    )
