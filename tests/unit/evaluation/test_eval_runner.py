"""`evaluate_file` and `aligner eval`: per-record verdicts, corrections made when missing, resume, the report."""

import json

import pytest
import typer
from typer.testing import CliRunner

from aligner_core.cli.evaluate import register
from aligner_core.evaluation import VERDICTS_FILE, Verdict, evaluate_file
from aligner_core.jobs.files import OutputExistsError


class LengthJudge:
    """Prefers the longer answer on 'length' and the one without 'rude' on 'manners'; can fail on cue."""

    name = "length-judge"
    dimensions = ("length", "manners")

    def __init__(self, fail_on: str | None = None):
        self.fail_on = fail_on
        self.seen: list[str] = []

    def judge_batch(self, items, *, on_result=None):
        out = []
        for i, it in enumerate(items):
            if self.fail_on and self.fail_on in it.question:
                raise ConnectionError("judge went away")
            self.seen.append(it.question)
            d = len(it.correction) - len(it.original)
            rude = ("rude" in it.original) - ("rude" in it.correction)
            out.append(
                {
                    "length": Verdict(
                        "win" if d > 0 else "loss" if d < 0 else "tie",
                        scores=(len(it.original), len(it.correction)),
                    ),
                    "manners": Verdict("win" if rude > 0 else "loss" if rude < 0 else "tie"),
                }
            )
            if on_result:
                on_result(i)
        return out


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


RECORDS = [
    {"id": 0, "question": "Q0?", "answer": "short", "correction": "a longer answer"},
    {"id": 1, "question": "Q1?", "answer": "a rude long answer", "correction": "kind"},
    {"id": 2, "question": "Q2?", "answer": "same", "correction": "same"},
    {"id": 3, "question": "Q3?", "answer": "needs an Aligner"},
    "{not json",
    {"id": 5, "question": "Q5?"},
]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluate_file_writes_verdicts_and_report(tmp_path, tiny_aligner):
    pytest.importorskip("matplotlib")
    inp = write(tmp_path / "in.jsonl", RECORDS)
    judge = LengthJudge()
    result = evaluate_file(
        inp,
        tmp_path / "report",
        judge,
        aligner=tiny_aligner,
        chunk_size=4,
        show_progress=False,
        n_resamples=200,
    )
    assert judge.seen == ["Q0?", "Q1?", "Q3?"]  # the unchanged record is a tie without asking the judge
    rows = read(tmp_path / "report" / VERDICTS_FILE)
    assert len(rows) == 6 and (result.written, result.failed, result.generated) == (6, 2, 1)
    assert rows[0]["eval"]["verdicts"]["length"] == {"outcome": "win", "scores": [5.0, 15.0]}
    assert rows[1]["eval"]["verdicts"]["manners"]["outcome"] == "win"
    assert rows[2]["eval"]["changed"] is False and rows[2]["eval"]["similarity"] == 1.0
    assert rows[2]["eval"]["verdicts"] == {
        "length": {"outcome": "tie", "unchanged": True},
        "manners": {"outcome": "tie", "unchanged": True},
    }
    assert (
        rows[3]["correction"] == tiny_aligner.correct("Q3?", "needs an Aligner").text
    )  # made by the Aligner
    assert "completion_tokens" in rows[3]["aligner"] and rows[3]["eval"]["judge"] == "length-judge"
    assert rows[4]["line"] == 5 and "invalid JSON" in rows[4]["eval_error"]["message"]
    assert "missing field" in rows[5]["eval_error"]["message"]
    s = result.summary
    assert (s.records, s.failed, s.judge) == (6, 2, "length-judge")
    length = s.dimensions[0]
    assert length.dimension == "length" and length.wins + length.ties + length.losses == 4
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| length |" in report and "| manners | 1 | 3 | 0 | 0 | +25.0% |" in report
    assert "![win rates](win_rates.png)" in report
    for name in ("win_rates.png", "outcomes.png", "similarity.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["records"] == 6


def test_unchanged_corrections_can_be_judged_too(tmp_path):
    judge = LengthJudge()
    evaluate_file(
        write(tmp_path / "in.jsonl", RECORDS[2:3]),
        tmp_path / "r",
        judge,
        judge_unchanged=True,
        show_progress=False,
        plots=False,
    )
    assert judge.seen == ["Q2?"]


def test_records_without_correction_and_no_aligner_fail_alone(tmp_path):
    inp = write(tmp_path / "in.jsonl", RECORDS[:4])
    result = evaluate_file(inp, tmp_path / "r", LengthJudge(), show_progress=False, plots=False)
    rows = read(tmp_path / "r" / VERDICTS_FILE)
    assert result.failed == 1 and "no 'correction'" in rows[3]["eval_error"]["message"]
    assert (
        not (tmp_path / "r" / "win_rates.png").exists()
        and "![" not in (tmp_path / "r" / "report.md").read_text()
    )


def test_aligner_loader_is_called_only_when_needed(tmp_path, tiny_aligner):
    calls = []

    def load():
        calls.append(1)
        return tiny_aligner

    evaluate_file(
        write(tmp_path / "a.jsonl", RECORDS[:3]),
        tmp_path / "a",
        LengthJudge(),
        aligner=load,
        show_progress=False,
        plots=False,
    )
    assert calls == []
    evaluate_file(
        write(tmp_path / "b.jsonl", RECORDS[:4] * 2),
        tmp_path / "b",
        LengthJudge(),
        aligner=load,
        chunk_size=2,
        show_progress=False,
        plots=False,
    )
    assert calls == [1]


def test_resume_after_a_crash_neither_loses_nor_repeats(tmp_path):
    records = [{"question": f"Q{i}?", "answer": "a" * i, "correction": "b" * (5 - i)} for i in range(1, 9)]
    inp = write(tmp_path / "in.jsonl", records)
    out = tmp_path / "out"
    with pytest.raises(ConnectionError):
        evaluate_file(inp, out, LengthJudge(fail_on="Q6?"), chunk_size=2, show_progress=False, plots=False)
    assert len(read(out / VERDICTS_FILE)) == 4  # two durable chunks
    with open(out / VERDICTS_FILE, "a") as f:
        f.write('{"question": "Q5?", "ans')  # a torn write
    with pytest.raises(OutputExistsError, match="--resume"):
        evaluate_file(inp, out, LengthJudge(), show_progress=False, plots=False)
    judge = LengthJudge()
    result = evaluate_file(inp, out, judge, chunk_size=2, resume=True, show_progress=False, plots=False)
    assert judge.seen == ["Q5?", "Q6?", "Q7?", "Q8?"] and result.skipped == 4
    rows = read(out / VERDICTS_FILE)
    assert [r["question"] for r in rows] == [f"Q{i}?" for i in range(1, 9)]
    assert result.summary.records == 8 and result.summary.dimensions[0].judged == 8


def cli_app():
    app = typer.Typer()

    @app.callback()
    def _root():
        pass

    register(app)
    return app


def test_cli_with_a_reward_model_and_with_a_local_chat_judge(tmp_path, tiny_model_dir):
    pytest.importorskip("matplotlib")
    pytest.importorskip("langchain_core")
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tests.conftest import build_tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    rm_dir = tmp_path / "rm"
    LlamaForSequenceClassification(cfg).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    inp = write(tmp_path / "in.jsonl", RECORDS[:3])
    runner = CliRunner()
    res = runner.invoke(
        cli_app(),
        [
            "eval",
            str(inp),
            "-o",
            str(tmp_path / "rm-report"),
            "--reward-model",
            str(rm_dir),
            "--reward-dimension",
            "safety",
            "--lower-is-better",
            "--tie-margin",
            "0.001",
            "--no-progress",
            "--no-plots",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "| safety |" in res.stdout
    rows = read(tmp_path / "rm-report" / VERDICTS_FILE)
    assert [len(r["eval"]["verdicts"]["safety"].get("scores", ())) for r in rows] == [
        2,
        2,
        0,
    ]  # row 2 is unchanged

    res = runner.invoke(
        cli_app(),
        [
            "eval",
            str(inp),
            "-o",
            str(tmp_path / "llm-report"),
            "--judge",
            str(tiny_model_dir),
            "--dimensions",
            "helpfulness",
            "--judge-max-tokens",
            "4",
            "--no-progress",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = read(tmp_path / "llm-report" / VERDICTS_FILE)
    assert [len(r["eval"]["verdicts"]["helpfulness"].get("orders", ())) for r in rows] == [2, 2, 0]
    assert (tmp_path / "llm-report" / "win_rates.png").exists()
    res = runner.invoke(
        cli_app(), ["eval", str(inp), "-o", str(tmp_path / "llm-report"), "--judge", str(tiny_model_dir)]
    )
    assert res.exit_code == 2 and "--resume" in res.output


def test_cli_argument_errors(tmp_path):
    inp = write(tmp_path / "in.jsonl", RECORDS[:1])
    runner = CliRunner()
    res = runner.invoke(cli_app(), ["eval", str(inp), "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and "exactly one of --judge" in res.output
    res = runner.invoke(
        cli_app(), ["eval", str(inp), "-o", str(tmp_path / "r"), "--judge", "x", "--resume", "--overwrite"]
    )
    assert res.exit_code == 2 and "contradict" in res.output
    res = runner.invoke(
        cli_app(), ["eval", str(inp), "-o", str(tmp_path / "r"), "--judge", str(tmp_path / "no-such-model")]
    )
    assert res.exit_code == 2 and "error:" in res.output


def test_missing_optional_packages_name_the_extra(tmp_path, monkeypatch):
    import sys

    from aligner_core import MissingDependencyError
    from aligner_core.evaluation import LLMJudge, summarize, write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependencyError, match=r"llm-aligner\[eval\]"):
        write_report(summarize([]), tmp_path)
    assert (tmp_path / "report.md").exists() is False
    write_report(summarize([]), tmp_path, plots=False)  # the Markdown report needs no matplotlib
    monkeypatch.setitem(sys.modules, "langchain_core.messages", None)
    with pytest.raises(MissingDependencyError, match="LLM judge"):
        LLMJudge(object())
