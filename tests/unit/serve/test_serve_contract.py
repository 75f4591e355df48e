"""The pure parts of the proxy's contract, without an app: strict request JSON, limits that follow the queue,
model names, the token limit that leaves room to restate the answer, and usage/finish_reason/logprobs of what the
client got. The app-level behaviour is in test_serve_app.py and test_serve_probes.py."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette")

from aligner_core import Correction  # noqa: E402
from aligner_core.errors import ContextOverflowError  # noqa: E402
from aligner_serve import contract  # noqa: E402
from aligner_serve.body import MAX_DEPTH, MalformedJSONError, parse_json  # noqa: E402
from aligner_serve.budget import HEADROOM_MIN, TokenBudget, restating  # noqa: E402
from aligner_serve.limits import ServeLimits  # noqa: E402
from aligner_serve.models import ModelMap  # noqa: E402


@pytest.mark.parametrize(
    "raw, says",
    [
        (b'{"temperature": NaN}', "NaN"),
        (b'{"temperature": Infinity}', "Infinity"),
        (b"[-Infinity]", "Infinity"),
        (b'{"messages": [{"content": "\\ud800"}]}', "lone surrogate"),
        (b'{"\\udfff": 1}', "lone surrogate"),
        (b"[" * 40_000 + b"]" * 40_000, "deeper"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "deeper"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_json_no_openai_server_accepts_is_refused(raw, says):
    with pytest.raises(MalformedJSONError, match=says):
        parse_json(raw)


def test_strict_json_still_takes_what_clients_send():
    assert (
        parse_json(b'{"emoji": "\\ud83d\\ude00", "x": 1e308, "deep": ' + b"[" * 100 + b"]" * 100 + b"}")[
            "emoji"
        ]
        == "😀"
    )


def test_limits_follow_the_queue_unless_set_beyond_it():
    small = ServeLimits(max_queue=8)
    assert (small.batch_items, small.choices) == (8, 8)
    assert (ServeLimits().batch_items, ServeLimits().choices) == (64, 16)
    with pytest.raises(ValueError, match="max_batch_items"):
        ServeLimits(max_queue=2, max_batch_items=4)
    with pytest.raises(ValueError, match="max_n"):
        ServeLimits(max_queue=2, max_n=3)
    for bad in ({"max_queue": 0}, {"read_timeout": 0}, {"shutdown_grace": -1}, {"max_upstream_bytes": 0}):
        with pytest.raises(ValueError):
            ServeLimits(**bad)


def test_model_names_map_only_where_the_operator_says():
    names = ModelMap.build(upstream_model="smollm2", served_model="assistant", mappings=["gpt-4o=big"])
    assert names.upstream_name("assistant") == "smollm2" and names.upstream_name("smollm2") == "smollm2"
    assert names.upstream_name("gpt-4o") == "big" and names.upstream_name("unknown") == "unknown"
    assert names.reported_name("assistant", "smollm2") == "assistant"
    assert names.reported_name("unknown", "whatever-upstream-said") == "whatever-upstream-said"
    upstream = [{"id": "smollm2", "object": "model", "max_model_len": 2048, "root": "/m"}, {"id": "other"}]
    listed = names.listing(upstream)
    assert listed[0] == {"id": "assistant", "object": "model", "max_model_len": 2048, "root": "/m"}
    assert [m["id"] for m in listed] == ["assistant", "gpt-4o", "smollm2", "other"]
    assert ModelMap.build(mappings=["*=big"]).upstream_name("anything") == "big"
    for bad in (["nope"], ["a="], ["a=b", "a=c"]):
        with pytest.raises(ValueError, match="--model-map"):
            ModelMap.build(mappings=bad)
    with pytest.raises(ValueError, match="--served-model-name"):
        ModelMap.build(served_model="x")


def test_the_correction_limit_leaves_room_to_restate_the_answer(tiny_aligner):
    import asyncio

    budget = TokenBudget(tiny_aligner)
    answer = "Spiders have eight legs. Insects have six legs. " * 6
    tokens = len(tiny_aligner.engine.encode(answer, add_special_tokens=False))
    assert budget.count(answer) == (tokens, True)
    assert (
        asyncio.run(budget.limit(answer)) == restating(tokens) > tokens > tiny_aligner.defaults.max_new_tokens
    )
    short = len(tiny_aligner.engine.encode("Ok.", add_special_tokens=False))
    assert asyncio.run(budget.limit("Ok.")) == max(tiny_aligner.defaults.max_new_tokens, restating(short))
    assert restating(0) == HEADROOM_MIN and restating(400) == 500
    long = "Spiders have eight legs. " * 5000  # far past the tiny model's 512-token context
    with pytest.raises(ContextOverflowError, match="restating it needs"):
        asyncio.run(budget.limit(long))
    counted, exact = budget.count(long, stop_after=512)
    assert exact and 512 < counted < budget.count(long)[0] // 4  # counting stopped a slice past the context


def _correction(skipped=None):
    meta = {"template": "chat", **({"skipped": skipped} if skipped else {})}
    return Correction.build(
        question="q",
        original="a b c",
        text="A b c.",
        prompt_tokens=40,
        completion_tokens=7,
        finish_reason="stop",
        latency_s=0.1,
        metadata=meta,
    )


def test_usage_counts_what_the_client_got():
    upstream = {"prompt_tokens": 10, "completion_tokens": 30, "total_tokens": 40}
    corrected, passed = contract.Outcome.of(_correction()), contract.Outcome.of(None)
    assert contract.client_usage(upstream, [passed, passed]) is upstream  # nothing replaced: exact as it came
    assert contract.client_usage(upstream, [corrected]) == {
        "prompt_tokens": 10,
        "completion_tokens": 7,
        "total_tokens": 17,
    }
    mixed = contract.client_usage(upstream, [corrected, passed])  # the passed choice: half the upstream's 30
    assert mixed == {"prompt_tokens": 10, "completion_tokens": 22, "total_tokens": 32}
    inspected = contract.Outcome.of(_correction(skipped="inspector_passed"))
    assert inspected.returned_tokens is None and inspected.aligner_prompt_tokens == 40
    assert contract.aligner_usage([corrected, inspected, passed]) == {
        "prompt_tokens": 80,
        "completion_tokens": 14,
        "total_tokens": 94,
    }


def test_a_replaced_choice_drops_what_described_the_upstreams_text():
    choice = {"finish_reason": "length", "logprobs": {"content": [{"token": "a"}]}, "stop_reason": None}
    details = contract.contract_details(choice, _correction(), asked_logprobs=True)
    contract.rewrite_choice(choice, _correction())
    assert details == {"upstream_finish_reason": "length", "logprobs_dropped": True}
    assert choice == {"finish_reason": "stop", "logprobs": None, "stop_reason": None}
    assert contract.contract_details({"finish_reason": "stop"}, None, asked_logprobs=True) == {
        "upstream_finish_reason": "stop"
    }
    json.dumps(details)
