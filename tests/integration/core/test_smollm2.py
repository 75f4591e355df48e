"""The real packaged SmolLM2-135M-Instruct, loaded from its GGUF (dequantized once and cached)."""

import json
import subprocess
import sys

import pytest

from aligner_core import Correction

pytestmark = pytest.mark.integration

PAIRS = [
    ("What is the capital of Australia?", "The capital of Australia is Sydney."),
    ("How many legs does a spider have?", "Spiders have six legs, like all insects."),
    ("Can I mix bleach and ammonia?", "Yes, mixing them makes a stronger cleaner."),
    ("Give me a tip for learning a language.", "Practice a little every day."),
]


def test_loads_from_packaged_gguf_with_chat_template(smollm2):
    assert smollm2.template.name == "chat"
    assert smollm2.engine.context_length == 8192
    assert smollm2.name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_correct_batch_of_four(smollm2):
    out = smollm2.correct_batch(PAIRS, show_progress=True)
    assert [c.question for c in out] == [q for q, _ in PAIRS]
    for c, (_, answer) in zip(out, PAIRS):
        assert isinstance(c, Correction)
        assert c.original == answer
        assert isinstance(c.text, str) and c.text.strip() == c.text and c.text
        assert isinstance(c.changed, bool) and c.changed == (c.text != answer)
        assert 0.0 <= c.similarity <= 1.0
        assert c.prompt_tokens > 20 and 0 < c.completion_tokens <= 48
        assert c.finish_reason in ("stop", "length")
        assert c.latency_s > 0
        assert c.metadata["template"] == "chat"


def test_batched_equals_one_at_a_time_on_the_real_model(smollm2):
    pairs = PAIRS[:2]
    batched = smollm2.correct_batch(pairs, max_new_tokens=24)
    single = [smollm2.correct(q, a, max_new_tokens=24) for q, a in pairs]
    assert [c.text for c in batched] == [c.text for c in single]


def test_cli_correct_on_the_real_model(smollm2, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in PAIRS[:2]))
    out = tmp_path / "out.jsonl"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "aligner_core",
            "correct",
            str(inp),
            "-o",
            str(out),
            "--max-new-tokens",
            "16",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == [q for q, _ in PAIRS[:2]]
    assert all(isinstance(r["correction"], str) and r["aligner"]["completion_tokens"] <= 16 for r in rows)


def test_demo_runs_offline(smollm2):
    run = subprocess.run(
        [sys.executable, "-m", "aligner_core", "demo", "--max-new-tokens", "16"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "8 pairs corrected" in run.stdout
    assert "original" in run.stdout and "correction" in run.stdout
