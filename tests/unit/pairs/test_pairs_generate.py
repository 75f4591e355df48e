"""A whole bootstrapping round on tiny models: the upstream answers, the Aligner corrects, pairs are written."""

import json

import pytest
import typer
from typer.testing import CliRunner

from aligner_core.cli.pairs import register
from aligner_core.errors import TemplateError
from aligner_core.jobs.files import OutputExistsError
from aligner_core.pairs import TransformersUpstream, generate_round, iter_prompts

QUESTIONS = ["What is 12 times 12?", "How many legs does a spider have?", "Why is the sky blue?"]


@pytest.fixture
def upstream(tiny_model, tiny_tokenizer):
    return TransformersUpstream(tiny_model, tiny_tokenizer, max_new_tokens=8)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_upstream_answers_through_the_chat_template(upstream, tiny_model, tiny_tokenizer):
    assert upstream.render("Q?") == "<|user|>Q?\n<|assistant|>"
    answers = upstream(QUESTIONS)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert upstream(QUESTIONS[:1]) == answers[:1]  # greedy and batch-independent
    plain = TransformersUpstream(tiny_model, tiny_tokenizer, prompt_format="Question: {question}\nAnswer:")
    assert plain.render("Q?") == "Question: Q?\nAnswer:"


def test_upstream_without_chat_template_needs_a_prompt_format(tiny_model):
    from tests.conftest import build_tokenizer

    with pytest.raises(TemplateError, match="prompt_format"):
        TransformersUpstream(tiny_model, build_tokenizer(chat=False))


def test_iter_prompts_reads_jsonl_and_text(tmp_path):
    (tmp_path / "p.txt").write_text("Q1?\n\nQ2?\n")
    assert list(iter_prompts(tmp_path / "p.txt")) == ["Q1?", "Q2?"]
    assert list(iter_prompts(tmp_path / "p.txt", skip=1)) == ["Q2?"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "Q1?"}\n{"other": 1}\n')
    out = list(iter_prompts(tmp_path / "p.jsonl", question_field="prompt"))
    assert out[0] == "Q1?" and isinstance(out[1], ValueError)


def test_generate_round_writes_records_and_pairs_and_resumes(tmp_path, upstream, tiny_aligner):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(QUESTIONS) + "\n")
    out = tmp_path / "pairs.jsonl"
    result = generate_round(
        prompts,
        out,
        upstream=upstream,
        aligner=tiny_aligner,
        chunk_size=2,
        show_progress=False,
        pair_options={"max_similarity": 1.0, "conversational": True},
    )
    records = read(tmp_path / "pairs.records.jsonl")
    assert [r["question"] for r in records] == QUESTIONS and result.generated == 3
    answers = upstream(QUESTIONS)
    fixes = tiny_aligner.correct_batch(list(zip(QUESTIONS, answers)))
    assert [(r["answer"], r["correction"]) for r in records] == [(a, f.text) for a, f in zip(answers, fixes)]
    pairs = read(out)
    assert (
        result.pairs.written
        == len(pairs)
        == sum(r["correction"].strip() != r["answer"].strip() for r in records)
    )
    assert all(p["prompt"][0]["role"] == "user" for p in pairs)
    with pytest.raises(OutputExistsError):
        generate_round(prompts, out, upstream=upstream, aligner=tiny_aligner, show_progress=False)
    # a round killed after its first chunk resumes where it stopped
    (tmp_path / "pairs.records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    calls = []
    resumed = generate_round(
        prompts,
        out,
        upstream=lambda qs: calls.append(list(qs)) or upstream(qs),
        aligner=tiny_aligner,
        resume=True,
        show_progress=False,
        pair_options={"max_similarity": 1.0},
    )
    assert calls == [QUESTIONS[2:]] and resumed.skipped == 2
    strip = lambda rows: [{k: v for k, v in r.items() if k != "aligner"} for r in rows]  # noqa: E731 (latency differs)
    assert strip(read(tmp_path / "pairs.records.jsonl")) == strip(records)


def test_failures_are_recorded_not_paired(tmp_path, tiny_aligner):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"question": "Q1?"}\n{"question": ""}\n{"question": "Q3?"}\n')

    def flaky(questions):
        return [RuntimeError("rate limited") if q == "Q3?" else "An answer." for q in questions]

    result = generate_round(
        prompts, tmp_path / "p.jsonl", upstream=flaky, aligner=tiny_aligner, show_progress=False
    )
    records = read(tmp_path / "p.records.jsonl")
    assert result.failed == 2 and result.generated == 1
    assert "no 'question'" in records[1]["error"] and "rate limited" in records[2]["error"]
    assert result.pairs.invalid == 2


def test_langchain_chat_model_as_upstream(tmp_path, tiny_model, tiny_tokenizer, tiny_aligner):
    pytest.importorskip("langchain_core")
    from langchain_aligner.local_chat import ChatTransformers

    chat = ChatTransformers(model=tiny_model, tokenizer=tiny_tokenizer, max_tokens=6)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Q1?\n")
    result = generate_round(
        prompts, tmp_path / "p.jsonl", upstream=chat, aligner=tiny_aligner, show_progress=False
    )
    assert result.generated + result.failed == 1
    assert read(tmp_path / "p.records.jsonl")[0]["question"] == "Q1?"


def test_cli_generate_round(tmp_path, tiny_model_dir):
    app = typer.Typer()

    @app.callback()
    def _root():
        pass

    register(app)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(QUESTIONS[:2]) + "\n")
    res = CliRunner().invoke(
        app,
        [
            "pairs",
            "--generate",
            "--upstream",
            str(tiny_model_dir),
            "--prompts",
            str(prompts),
            "-o",
            str(tmp_path / "pairs.jsonl"),
            "--model",
            str(tiny_model_dir),
            "--upstream-max-new-tokens",
            "6",
            "--max-new-tokens",
            "6",
            "--max-similarity",
            "1.0",
            "--no-progress",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "answered and corrected 2 prompts" in res.output and "pairs from 2 records" in res.output
    assert len(read(tmp_path / "pairs.records.jsonl")) == 2
