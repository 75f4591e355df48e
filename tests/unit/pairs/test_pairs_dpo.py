"""The pairs file feeds TRL: it loads with `datasets`, passes DPOTrainer's own dataset preparation, and one DPO
step on a tiny Llama completes (standard and conversational forms)."""

import copy
import json

import pytest

pytest.importorskip("datasets")
pytest.importorskip("trl")

from aligner_core.pairs import write_pairs  # noqa: E402
from tests.conftest import build_model, build_tokenizer  # noqa: E402

RECORDS = [
    {
        "question": f"What is {n} times {n}?",
        "answer": f"It is {n * n + 1}.",
        "correction": f"{n} times {n} is {n * n}.",
    }
    for n in range(2, 6)
] + [{"question": "Q?", "answer": "Same.", "correction": "Same."}]


@pytest.fixture
def records(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def trainer_for(tmp_path, pairs_path):
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    dataset = load_dataset("json", data_files=str(pairs_path), split="train")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer).train()
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        max_steps=1,
        per_device_train_batch_size=2,
        max_length=64,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    # TRL would reload the reference from the model's path; a model built from config has none, so pass a copy.
    return DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model).eval(),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    ), dataset


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_pairs_pass_trl_dataset_preparation(tmp_path, records, conversational):
    from trl.data_utils import is_conversational

    out = tmp_path / "pairs.jsonl"
    stats = write_pairs(records, out, conversational=conversational)
    assert (stats.written, stats.unchanged) == (4, 1)
    trainer, dataset = trainer_for(tmp_path, out)
    assert dataset.column_names == ["prompt", "chosen", "rejected"] and len(dataset) == 4
    assert is_conversational(dataset[0]) is conversational
    prepared = trainer.train_dataset
    assert len(prepared) == 4 and {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(prepared.column_names)
    first = prepared[0]
    assert first["chosen_ids"] != first["rejected_ids"] and len(first["prompt_ids"]) > 0
    if not conversational:
        assert trainer.processing_class.decode(first["chosen_ids"]).endswith("</s>")  # TRL added EOS


def test_one_dpo_step_completes(tmp_path, records):
    import torch

    out = tmp_path / "pairs.jsonl"
    write_pairs(records, out, conversational=True)
    trainer, _ = trainer_for(tmp_path, out)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    result = trainer.train()
    assert result.global_step == 1 and result.training_loss == pytest.approx(
        0.6931, abs=1e-3
    )  # log(2) at step 0
    changed = [k for k, v in trainer.model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert changed  # the step updated the policy
