"""Inspectors for real: a tiny classifier trained from scratch tells aligned answers from misaligned ones on
records it never saw (held-out ROC AUC >= 0.9), and the packaged SmolLM2 is gated and trained as an inspector."""

from __future__ import annotations

import json
import time

import pytest

from aligner_core.gating import correct_batch_gated
from aligner_core.inspector import Inspector
from aligner_core.training.inspector import InspectorConfig, roc_auc, train_inspector
from tests.fixtures.data.inspector_task import build_classifier, build_tokenizer, make_split

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def one_thread():
    """One thread: on a shared 2-core machine two threads per process ran slower (oversubscription)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_tiny_inspector_learns_the_held_out_task(tmp_path, one_thread):
    train, held_out = make_split(n_train=640, n_test=80, seed=0)
    tokenizer = build_tokenizer()
    base = tmp_path / "base"
    build_classifier(tokenizer, hidden=128).save_pretrained(base)
    tokenizer.save_pretrained(base)
    pairs = [(r["question"], r["answer"]) for r in held_out]
    labels = [r["label"] for r in held_out]
    before = roc_auc(labels, Inspector.from_pretrained(base).score_batch(pairs))

    start = time.perf_counter()
    out = train_inspector(
        InspectorConfig(
            data=str(write_jsonl(tmp_path / "train.jsonl", train)),
            eval_data=str(write_jsonl(tmp_path / "held_out.jsonl", held_out)),
            base_model=str(base),
            output_dir=str(tmp_path / "inspector"),
            epochs=20,
            learning_rate=1e-3,  # a tiny model from scratch: far above the 2e-5 for pretrained ones
            warmup_ratio=0.1,
            weight_decay=0.0,
            batch_size=16,
            max_length=64,
            seed=0,
            logging_steps=100,
            report_to="none",
            progress=False,
        )
    )
    seconds = time.perf_counter() - start
    inspector = Inspector.from_pretrained(out)
    scores = inspector.score_batch(pairs)
    after = roc_auc(labels, scores)
    accuracy = sum((s >= 0.5) == bool(y) for s, y in zip(scores, labels)) / len(labels)
    recorded = json.loads((out / "inspector_config.json").read_text())
    print(
        f"\nheld-out AUC: untrained {before:.3f}, trained {after:.3f}; accuracy at 0.5 {accuracy:.2f} "
        f"({len(held_out)} records; train_inspector took {seconds:.1f}s)"
    )
    assert before < 0.75
    assert after >= 0.9
    assert recorded["metrics"]["eval_auc"] == pytest.approx(after, abs=1e-3)  # the Trainer's view agrees


def test_smollm2_answers_that_pass_cost_no_generation(smollm2):
    pairs = [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("What is 12 times 12?", "12 times 12 is 124."),
        ("How many legs does a spider have?", "A spider has eight legs."),
        ("Is the sun a star?", "Yes, the sun is a star."),
        ("Why is the sky blue?", "Because it reflects the ocean, duh."),
    ]
    flagged = {"12 times 12 is 124.", "Because it reflects the ocean, duh."}
    generated: list[list] = []

    def correct(sub):
        generated.append(list(sub))
        return smollm2.correct_batch(sub, max_new_tokens=24)

    results = correct_batch_gated(pairs, lambda q, a: 0.0 if a in flagged else 1.0, 0.5, correct)
    assert generated == [[pairs[1], pairs[4]]]
    direct = smollm2.correct_batch([pairs[1], pairs[4]], max_new_tokens=24)
    assert [results[1].text, results[4].text] == [c.text for c in direct]
    assert all(results[i].text == pairs[i][1] and results[i].completion_tokens == 0 for i in (0, 2, 3))


def test_smollm2_trains_as_an_inspector(tmp_path, one_thread):
    from aligner_core.loading import DEFAULT_MODEL
    from tests.conftest import require_packaged_model

    require_packaged_model()
    records = [
        {
            "question": "What is the capital of France?",
            "answer": "Paris is the capital of France.",
            "label": 1,
        },
        {"question": "What is the capital of France?", "answer": "Lyon, obviously.", "label": 0},
    ] * 2
    out = train_inspector(
        InspectorConfig(
            data=records,
            base_model=DEFAULT_MODEL,
            output_dir=str(tmp_path / "insp"),
            max_steps=2,
            batch_size=4,
            max_length=64,
            report_to="none",
            progress=False,
        )
    )
    inspector = Inspector.from_pretrained(out, batch_size=2)
    scores = inspector.score_batch([(r["question"], r["answer"]) for r in records[:2]] * 2)
    assert all(0.0 <= s <= 1.0 for s in scores) and scores[:2] == pytest.approx(scores[2:], abs=1e-5)
