"""Loading and checking training records before any compute; the eval split and the identity slice."""

from __future__ import annotations

import json

import pytest

from aligner_core.training import Fields, TrainingDataError, load_records
from aligner_core.training.data import identity_slice, split_eval

GOOD = {"question": "Q?", "answer": "A wrong.", "correction": "A right."}


def write_jsonl(path, lines):
    path.write_text(
        "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8"
    )
    return path


def test_jsonl_json_array_and_list(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", GOOD])  # blank lines are skipped
    assert [r.where for r in load_records(jsonl)] == ["line 1", "line 3"]
    array = tmp_path / "d.json"
    array.write_text(json.dumps([GOOD, GOOD]))
    assert [r.where for r in load_records(array)] == ["record 1", "record 2"]
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"data": [GOOD]}))
    assert len(load_records(wrapped)) == 1
    lines_named_json = write_jsonl(tmp_path / "l.json", [GOOD, GOOD])
    assert [r.where for r in load_records(lines_named_json)] == ["line 1", "line 2"]
    records = load_records([GOOD])
    assert (records[0].question, records[0].answer, records[0].correction) == ("Q?", "A wrong.", "A right.")


def test_field_names_are_configurable(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?", "response": "bad", "fixed": "good"}])
    [record] = load_records(path, Fields(question="prompt", answer="response", correction="fixed"))
    assert (record.question, record.answer, record.correction) == ("Q?", "bad", "good")


def test_every_problem_is_named_before_any_compute(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            GOOD,
            {"question": "Q?", "answer": "A."},  # line 2: no correction
            {},  # line 3: empty record
            {"question": "Q?", "answer": "  ", "correction": "x"},  # line 4: blank answer
            {"question": 3, "answer": "A.", "correction": "B."},  # line 5: not a string
            "{not json",  # line 6
            "[1, 2]",  # line 7: not an object
        ],
    )
    with pytest.raises(TrainingDataError) as info:
        load_records(path)
    message = str(info.value)
    assert "6 problems" in message
    assert "line 2: missing field 'correction' (has: answer, question)" in message
    assert "line 3: missing fields 'question', 'answer', 'correction' (has: none)" in message
    assert "line 4: empty 'answer'" in message
    assert "line 5: fields must be strings: 'question' is int" in message
    assert "line 6, column 2: invalid JSON" in message
    assert "line 7: expected a JSON object, got list" in message
    assert "- line 1:" not in message


def test_long_problem_lists_are_cut(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q"}] * 25)
    message = str(pytest.raises(TrainingDataError, load_records, path).value)
    assert (
        "25 problems" in message
        and "line 10:" in message
        and "line 11:" not in message
        and "15 more" in message
    )


def test_empty_and_unsupported_sources(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TrainingDataError, match="holds no records"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(TrainingDataError, match="unsupported file type '.txt'"):
        load_records(tmp_path / "d.txt")
    with pytest.raises(TrainingDataError, match="no such file"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(TrainingDataError, match="list of dicts"):
        load_records({"question": "Q"})  # type: ignore[arg-type]


def test_datasets_directory_and_csv(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([GOOD, {**GOOD, "correction": ""}])
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(TrainingDataError, match="row 2: empty 'correction'"):
        load_records(tmp_path / "ds")
    datasets.DatasetDict({"train": ds.select([0]), "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert [r.where for r in load_records(tmp_path / "dd", split="test")] == ["row 1"]
    with pytest.raises(TrainingDataError, match="no split 'validation'"):
        load_records(tmp_path / "dd", split="validation")
    (tmp_path / "d.csv").write_text("question,answer,correction\nQ?,bad,good\n")
    assert load_records(tmp_path / "d.csv")[0].correction == "good"


def test_eval_split_and_identity_slice_are_seeded_and_disjoint():
    records = load_records([{**GOOD, "answer": f"A{i}."} for i in range(50)])
    train, held = split_eval(records, 0.1, seed=3)
    assert (len(train), len(held)) == (45, 5)
    assert not {r.where for r in train} & {r.where for r in held}
    assert split_eval(records, 0.1, seed=3) == (train, held)
    identity = identity_slice(train, 0.2, seed=3)
    assert len(identity) == 9
    assert all(r.correction == r.answer and r.where.endswith("(identity)") for r in identity)
    assert {r.where.removesuffix(" (identity)") for r in identity} <= {r.where for r in train}
    assert identity_slice(train, 0.0, seed=3) == []
    assert len(identity_slice(train[:2], 0.1, seed=3)) == 1  # at least one record when the fraction is > 0
    with pytest.raises(TrainingDataError, match="leaves nothing to train on"):
        split_eval(records[:1], 0.5, seed=0)
