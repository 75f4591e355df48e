"""`aligner correct` and the JSONL job: durable chunks, resume without loss or duplicates, bad records."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from aligner_core.cli import main
from aligner_core.jobs.files import OutputExistsError, correct_jsonl
from aligner_core.jobs.jsonl import resume_offset


def write_input(path, n=12, bad=()):
    lines = []
    for i in range(n):
        if i in bad:
            lines.append("{not json" if i % 2 else json.dumps({"question": f"q{i}"}))
        else:
            lines.append(
                json.dumps({"id": i, "question": f"Question {i}?", "answer": f"Answer number {i} is here."})
            )
    path.write_text("\n".join(lines) + "\n")
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_correct_jsonl_writes_every_record_in_order(tiny_aligner, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", bad={3, 6})
    stats = correct_jsonl(tiny_aligner, inp, tmp_path / "out.jsonl", chunk_size=4, show_progress=False)
    rows = read(tmp_path / "out.jsonl")
    assert len(rows) == 12 and (stats.written, stats.failed) == (12, 2)
    assert [r.get("id") for r in rows if "id" in r] == [i for i in range(12) if i not in {3, 6}]
    assert (
        rows[6]["aligner_error"]["type"] == "InvalidInputError"
        and "missing field" in rows[6]["aligner_error"]["message"]
    )
    assert rows[3]["correction"] is None and rows[3]["line"] == 4  # invalid JSON, reported with its line
    assert "invalid JSON" in rows[3]["aligner_error"]["message"]
    good = rows[0]
    assert good["correction"] == tiny_aligner.correct("Question 0?", "Answer number 0 is here.").text
    assert set(good["aligner"]) >= {
        "changed",
        "similarity",
        "prompt_tokens",
        "completion_tokens",
        "finish_reason",
        "latency_s",
    }


def test_existing_output_needs_resume_or_overwrite(tiny_aligner, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", n=2)
    (tmp_path / "out.jsonl").write_text("")
    with pytest.raises(OutputExistsError, match="--resume"):
        correct_jsonl(tiny_aligner, inp, tmp_path / "out.jsonl", show_progress=False)
    correct_jsonl(tiny_aligner, inp, tmp_path / "out.jsonl", overwrite=True, show_progress=False)
    assert len(read(tmp_path / "out.jsonl")) == 2


def test_resume_offset_repairs_a_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    assert resume_offset(out) == 0
    out.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    assert resume_offset(out) == 2
    assert out.read_text() == '{"a": 1}\n{"a": 2}\n'
    out.write_text('{"a": 1}\n{"a": 2, "b\n')  # torn inside a string that held a newline byte
    assert resume_offset(out) == 1


def test_interrupted_run_resumes_without_loss_or_duplicates(tiny_aligner, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", n=10)
    clean = tmp_path / "clean.jsonl"
    correct_jsonl(tiny_aligner, inp, clean, chunk_size=3, show_progress=False)

    def crash_after_first_chunk(done):
        raise KeyboardInterrupt

    out = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        correct_jsonl(
            tiny_aligner, inp, out, chunk_size=3, show_progress=False, on_chunk=crash_after_first_chunk
        )
    assert len(read(out)) == 3
    with open(out, "a") as f:
        f.write('{"id": 3, "quest')  # and a torn write on top
    stats = correct_jsonl(tiny_aligner, inp, out, chunk_size=3, resume=True, show_progress=False)
    assert stats.skipped == 3 and stats.written == 7
    strip = lambda rows: [{k: v for k, v in r.items() if k != "aligner"} for r in rows]  # noqa: E731
    assert strip(read(out)) == strip(read(clean))


def test_cli_killed_mid_run_then_resumed(tiny_model_dir, tmp_path):
    """SIGKILL the real command between chunks, resume it, and compare with a clean run."""
    inp = write_input(tmp_path / "in.jsonl", n=40)
    out = tmp_path / "out.jsonl"
    args = [
        sys.executable,
        "-m",
        "aligner_core",
        "correct",
        str(inp),
        "-o",
        str(out),
        "--model",
        str(tiny_model_dir),
        "--chunk-size",
        "2",
        "--max-new-tokens",
        "24",
        "--no-progress",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    partial = out.read_text().count("\n")
    assert 4 <= partial <= 40
    done = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    clean = tmp_path / "clean.jsonl"
    subprocess.run([*args[:6], str(clean), *args[7:]], env=env, check=True, capture_output=True)
    got, want = read(out), read(clean)
    assert [r["id"] for r in got] == list(range(40))
    assert [r["correction"] for r in got] == [r["correction"] for r in want]


def test_cli_help_and_templates(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("correct", "demo", "templates"):
        assert command in text
    assert main(["templates"]) == 0
    assert "aligner-v1" in capsys.readouterr().out


def test_cli_correct_reports_failures_with_exit_code(tiny_model_dir, tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl", n=3, bad={1})
    out = tmp_path / "out.jsonl"
    code = main(
        [
            "correct",
            str(inp),
            "-o",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--max-new-tokens",
            "4",
            "--no-progress",
        ]
    )
    assert code == 1
    assert "1 failed" in capsys.readouterr().err
    assert len(read(out)) == 3
    assert main(["correct", str(inp), "-o", str(out), "--model", str(tiny_model_dir)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["correct", str(inp), "-o", str(out), "--model", str(tmp_path / "nope")]) == 2


def test_demo_word_diff_marks_removed_and_added_words():
    from aligner_core.cli.demo import word_diff

    text = word_diff("The capital is Sydney, a big city.", "The capital is Canberra, a big city.").plain
    assert text.strip() == "The capital is [-Sydney,-] {+Canberra,+} a big city."
