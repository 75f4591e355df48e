"""Multi-turn training, small: a 2-layer Llama learns corrections that depend on an earlier turn.

The conversation task (tests/fixtures/data/conversation_task.py) names the user's country only in the history;
the single-turn task of tests/fixtures/data/correction_task.py is mixed in. One run of the recipe (identity warm-up
on both, then Q-A-C) with the ``aligner-chat-history`` template; held-out exact match with
``Aligner.from_pretrained`` + ``correct_batch`` passing each record's ``chat_history``.
"""

from __future__ import annotations

import json
import time

import pytest

from aligner_core import Aligner
from aligner_core.history import normalize_history
from aligner_core.templates import get_template
from aligner_core.training import TrainConfig, train_aligner
from aligner_core.training.encode import ExampleEncoder
from tests.fixtures.data import conversation_task, correction_task

TEMPLATE = "aligner-chat-history"


def exact_match(aligner: Aligner, records: list[dict], *, with_history: bool = True) -> float:
    pairs = [
        {
            "question": r["question"],
            "answer": r["answer"],
            **({"history": r["chat_history"]} if with_history and "chat_history" in r else {}),
        }
        for r in records
    ]
    fixes = aligner.correct_batch(pairs, max_new_tokens=40)
    return sum(f.text.strip() == r["correction"].strip() for f, r in zip(fixes, records)) / len(records)


@pytest.fixture(scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("conversation-task")
    multi_train, multi_test = conversation_task.make_split(n_train=400, n_test=48, seed=0)
    single_train, single_test = correction_task.make_split(n_train=200, n_test=24, seed=0)
    train = [r for pair in zip(multi_train[:200], single_train) for r in pair] + multi_train[200:]
    tokenizer = correction_task.build_tokenizer(extra_texts=conversation_task.corpus())
    base = tmp / "base"
    correction_task.build_model(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    config = TrainConfig(
        data=str(data),
        base_model=str(base),
        output_dir=str(tmp / "aligner"),
        template=TEMPLATE,
        identity_fraction=0.5,
        identity_epochs=16,
        epochs=4,
        learning_rate=8e-3,
        warmup_ratio=0.05,
        batch_size=16,
        gradient_accumulation_steps=1,
        gradient_checkpointing=False,
        logging_steps=50,
        save_steps=10_000,
        seed=0,
        report_to="none",
        progress=False,
    )
    start = time.perf_counter()
    out = train_aligner(config)
    return {
        "base": base,
        "out": out,
        "multi": multi_test,
        "single": single_test,
        "seconds": time.perf_counter() - start,
        "tokenizer": tokenizer,
    }


def test_training_ids_equal_what_inference_renders(trained, tiny_model):
    """The trainer encodes a record with history exactly as ``Aligner.prepare`` does for generation."""
    record = trained["multi"][0]
    tokenizer = trained["tokenizer"]
    history = normalize_history(record["chat_history"])
    encoder = ExampleEncoder(tokenizer, get_template(TEMPLATE))
    aligner = Aligner.from_pretrained(trained["out"], max_new_tokens=4)
    try:
        prepared = aligner.prepare(
            record["question"], record["answer"], aligner.defaults, history=record["chat_history"]
        )
        assert list(prepared.request.prompt_ids) == encoder.prompt_ids(
            record["question"], record["answer"], history
        )
        assert prepared.metadata["history_turns"] == 2
    finally:
        aligner.close()


def test_a_tiny_model_learns_corrections_that_depend_on_an_earlier_turn(trained):
    aligner = Aligner.from_pretrained(trained["out"], max_new_tokens=40)  # the template is recorded
    untrained = Aligner.from_pretrained(trained["base"], template=TEMPLATE, max_new_tokens=40)
    try:
        assert aligner.template.name == TEMPLATE
        multi = exact_match(aligner, trained["multi"])
        blind = exact_match(aligner, trained["multi"], with_history=False)
        single = exact_match(aligner, trained["single"])
        before = exact_match(untrained, trained["multi"])
    finally:
        aligner.close()
        untrained.close()
    print(
        f"\nheld-out exact match: multi-turn {multi:.2f} (without the history {blind:.2f}), single-turn {single:.2f}, "
        f"untrained {before:.2f}; training took {trained['seconds']:.1f}s"
    )
    assert before <= 0.05
    assert multi >= 0.8
    assert single >= 0.8  # the single-turn task still passes with the same template
    assert blind <= 0.25  # the country is only in the history: without it the model cannot know it
