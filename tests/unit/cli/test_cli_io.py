"""Issue 13: nothing lost from a pipe, the same input formats everywhere, help at 80 columns, --version."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aligner_core.cli import main
from aligner_core.cli.commands import versions
from aligner_core.jobs.records import RecordSourceError, check_input, count_items, iter_items

ROOT = Path(__file__).resolve().parents[3]
RECORDS = [{"id": i, "question": f"Question {i}?", "answer": f"Answer number {i} is here."} for i in range(7)]


def cli(tiny_model_dir: Path, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None):
    command = [
        sys.executable,
        "-m",
        "aligner_core",
        *args,
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "3",
        "--no-progress",
    ]
    return subprocess.run(
        command,
        input=stdin,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=300,
    )


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


# -- 1. pipes: - for stdin and stdout, and /dev/stdin --------------------------------------------


def test_a_real_pipe_in_and_out_loses_nothing(tiny_model_dir):
    done = cli(tiny_model_dir, "correct", "-", "-o", "-", stdin=jsonl(RECORDS))
    assert done.returncode == 0, done.stderr.decode()
    rows = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in RECORDS] and all("correction" in r for r in rows)
    assert "wrote 7 records to stdout" in done.stderr.decode()  # logs go to stderr, never into the data


def test_dev_stdin_is_read_once(tiny_model_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    done = cli(tiny_model_dir, "correct", "/dev/stdin", "-o", str(out), stdin=jsonl(RECORDS))
    assert done.returncode == 0, done.stderr.decode()
    assert len(out.read_text().splitlines()) == len(RECORDS)  # counting no longer eats the stream


def test_resume_to_stdout_is_refused_before_loading(tiny_model_dir):
    done = cli(tiny_model_dir, "correct", "-", "-o", "-", "--resume", stdin=jsonl(RECORDS))
    assert done.returncode == 2 and b"standard output" in done.stderr


# -- 3. the same input formats everywhere ------------------------------------------------------------


def write_formats(folder: Path) -> dict[str, Path]:
    paths = {"jsonl": folder / "in.jsonl", "json": folder / "in.json", "csv": folder / "in.csv"}
    paths["jsonl"].write_bytes(jsonl(RECORDS))
    paths["json"].write_text(json.dumps(RECORDS))
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "question", "answer"])
        writer.writeheader()
        writer.writerows(RECORDS)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        paths["parquet"] = folder / "in.parquet"
        pq.write_table(pa.Table.from_pylist(RECORDS), paths["parquet"])
    except ImportError:  # pragma: no cover - the dev install has pyarrow
        pass
    return paths


def test_every_format_reads_the_same_records(tmp_path):
    for kind, path in write_formats(tmp_path).items():
        items = list(iter_items(path))
        assert [str(i.record["question"]) for i in items] == [r["question"] for r in RECORDS], kind
        assert count_items(path) == len(RECORDS)


@pytest.mark.parametrize("kind", ["csv", "json", "parquet"])
def test_aligner_correct_reads_other_formats(tiny_model_dir, tmp_path, kind):
    path = write_formats(tmp_path).get(kind)
    if path is None:
        pytest.skip("pyarrow is not installed")
    out = tmp_path / f"out-{kind}.jsonl"
    done = cli(tiny_model_dir, "correct", str(path), "-o", str(out))
    assert done.returncode == 0, done.stderr.decode()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == [r["question"] for r in RECORDS] and all(
        r["correction"] is not None for r in rows
    )


def test_malformed_json_names_the_input_line_and_the_summary_names_the_failures(tiny_model_dir, tmp_path):
    lines = [
        json.dumps(RECORDS[0]),
        "",
        '{"question": "Q?",\n',
        json.dumps(RECORDS[1]),
        '["not", "an object"]',
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    done = cli(tiny_model_dir, "correct", str(inp), "-o", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert done.returncode == 1 and len(rows) == 4
    message = rows[1]["aligner_error"]["message"]
    assert (
        message.startswith("line 3, column ") and "invalid JSON" in message and "line 2 column" not in message
    )
    assert rows[1]["line"] == 3 and "failed: line 3, line 6" in done.stderr.decode()


def test_inputs_are_checked_before_a_model_loads(tmp_path, capsys):
    bad = tmp_path / "in.txt"
    bad.write_text("hello\n")
    for source, words in ((bad, "unsupported file type"), (tmp_path / "missing.jsonl", "no such file")):
        code = main(
            ["correct", str(source), "-o", str(tmp_path / "out.jsonl"), "--model", str(tmp_path / "no-model")]
        )
        err = capsys.readouterr().err
        assert code == 2 and words in err and "no-model" not in err
    with pytest.raises(RecordSourceError):
        check_input(bad)


# -- 4. help at 80 columns, --version, benchmarks --help ------------------------------------------------------


@pytest.mark.parametrize("command", ["", "correct", "demo", "templates", "train", "eval", "pairs", "cache"])
def test_help_reads_well_at_80_columns(command):
    args = [sys.executable, "-m", "aligner_core", *([command] if command else []), "--help"]
    done = subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"}, timeout=120
    )
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= 80
    assert "…" not in done.stdout  # no option name cut short


def test_version_names_the_library_torch_and_transformers(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert (
        out.strip() == versions()
        and out.startswith("llm-aligner ")
        and "torch " in out
        and "transformers " in out
    )


@pytest.mark.parametrize(
    "module", sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")
)
def test_every_benchmark_takes_help(module):
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower()
