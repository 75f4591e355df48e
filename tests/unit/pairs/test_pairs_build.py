"""Preference pairs from (question, answer, correction) records: formats, the similarity threshold, counts, the CLI."""

import json

import pytest
import typer
from typer.testing import CliRunner

from aligner_core.cli.pairs import register
from aligner_core.jobs.files import OutputExistsError
from aligner_core.pairs import PairStats, classify, make_pair, pairs_from_records, write_pairs

RECORDS = [
    {
        "question": "What is 12 times 12?",
        "answer": "12 times 12 is 124.",
        "correction": "12 times 12 is 144.",
    },
    {"question": "Capital of Australia?", "answer": "Sydney.", "correction": "Canberra, not Sydney."},
    {"question": "Q?", "answer": "Same answer.", "correction": "  Same answer.\n"},  # unchanged
    {
        "question": "Q?",
        "answer": "A long answer that is almost right here.",
        "correction": "A long answer that is almost right here!",
    },
    {
        "question": "Q?",
        "answer": "An answer.",
        "correction": None,
        "aligner_error": {"type": "X", "message": "y"},
    },
    {"question": "Q?", "answer": "   ", "correction": "Something."},
    {"question": "Q?", "correction": "No answer field."},
]


def test_standard_and_conversational_pairs():
    assert make_pair("Q?", "bad", "good") == {"prompt": "Q?\n\n", "chosen": "good", "rejected": "bad"}
    assert make_pair(
        "Q?", "bad", "good", prompt_format="User: {question}\nAssistant:", system="Be kind."
    ) == {
        "prompt": "Be kind.\n\nUser: Q?\nAssistant:",
        "chosen": "good",
        "rejected": "bad",
    }
    assert make_pair("Q {question}?", "bad", "good", conversational=True, system="Be kind.") == {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q {question}?"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }


def test_threshold_drops_unchanged_and_nearly_unchanged_and_counts_them():
    assert [classify(r) for r in RECORDS] == [
        "keep",
        "keep",
        "unchanged",
        "similar",
        "invalid",
        "invalid",
        "invalid",
    ]
    pairs, stats = pairs_from_records([*RECORDS, ValueError("line 9: invalid JSON")])
    assert [p["chosen"] for p in pairs] == ["12 times 12 is 144.", "Canberra, not Sydney."]
    assert stats == PairStats(records=8, written=2, unchanged=1, similar=1, invalid=4) and stats.dropped == 6
    assert (
        stats.describe() == "2 pairs from 8 records; dropped 6 (1 unchanged, 1 nearly unchanged, 4 invalid)"
    )
    # 1.0 keeps every changed pair; a low threshold drops the small edit of record 0 too
    assert pairs_from_records(RECORDS, max_similarity=1.0)[1].written == 3
    low, low_stats = pairs_from_records(RECORDS, max_similarity=0.6)  # similarities: 0.947 and 0.5
    assert [p["chosen"] for p in low] == ["Canberra, not Sydney."] and low_stats.similar == 2
    with pytest.raises(ValueError, match="max_similarity"):
        pairs_from_records(RECORDS, max_similarity=0)
    with pytest.raises(ValueError, match="prompt_format"):
        pairs_from_records(RECORDS, prompt_format="no placeholder")


def test_write_pairs_is_atomic_and_asks_before_replacing(tmp_path):
    inp = tmp_path / "records.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "{torn\n")
    out = tmp_path / "pairs.jsonl"
    stats = write_pairs(inp, out, conversational=True, question_field="question")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == stats.written == 2 and stats.invalid == 4
    assert rows[1]["prompt"] == [{"role": "user", "content": "Capital of Australia?"}]
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_pairs(inp, out)
    write_pairs(inp, out, overwrite=True, max_similarity=1.0)
    assert len(out.read_text().splitlines()) == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_cli_builds_pairs_and_reports_counts(tmp_path):
    app = typer.Typer()

    @app.callback()
    def _root():
        pass

    register(app)
    inp = tmp_path / "records.jsonl"
    inp.write_text(
        "".join(
            json.dumps({"q": r["question"], "a": r.get("answer"), "c": r["correction"]}) + "\n"
            for r in RECORDS
        )
    )
    runner = CliRunner()
    args = [
        "pairs",
        str(inp),
        "-o",
        str(tmp_path / "pairs.jsonl"),
        "--question-field",
        "q",
        "--answer-field",
        "a",
        "--correction-field",
        "c",
        "--conversational",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (
        "wrote 2 pairs from 7 records; dropped 5 (1 unchanged, 1 nearly unchanged, 3 invalid)" in res.output
    )
    assert (
        json.loads((tmp_path / "pairs.jsonl").read_text().splitlines()[0])["chosen"][0]["role"] == "assistant"
    )
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = runner.invoke(app, ["pairs", "-o", str(tmp_path / "p.jsonl")])
    assert res.exit_code == 2 and "--generate" in res.output
    res = runner.invoke(app, ["pairs", "-o", str(tmp_path / "p.jsonl"), "--generate", "--upstream", "x"])
    assert res.exit_code == 2 and "--prompts" in res.output
