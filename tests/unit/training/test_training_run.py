"""Short real runs on the tiny fixture Llama: settings checks, output directory rules, resume, the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import typer
from typer.testing import CliRunner

from aligner_core import Aligner
from aligner_core.training import TrainConfig, TrainConfigError, TrainingDataError, register, train_aligner
from aligner_core.training.arguments import report_to
from tests.conftest import build_model, build_tokenizer
from tests.fixtures.data.correction_task import make_split

RECORDS = make_split(n_train=24, n_test=1, seed=5)[0]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    tokenizer = build_tokenizer()
    d = tmp_path_factory.mktemp("tiny-base")
    build_model(tokenizer).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def small(base_dir, data, out, **overrides):
    settings = dict(
        data=str(data),
        base_model=str(base_dir),
        output_dir=str(out),
        template="aligner-general",
        identity_fraction=0.25,
        epochs=1,
        batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        max_length=512,
        gradient_checkpointing=False,
        save_steps=3,
        save_total_limit=None,
        logging_steps=1,
        report_to="none",
        progress=False,
        seed=1,
    )
    return TrainConfig(**{**settings, **overrides})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"identity_fraction": 1.5}, r"identity_fraction must be a number in \[0, 1\], got 1.5"),
        ({"eval_fraction": 1.0}, r"eval_fraction must be a number in \[0, 1\)"),
        ({"learning_rate": 0}, "learning_rate must be a positive number, got 0"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"max_steps": 0}, "max_steps must be a positive integer or -1"),
        ({"overlong": "cut"}, "overlong must be one of error, drop, truncate; got 'cut'"),
        ({"lr_scheduler": "polynomial"}, "lr_scheduler must be one of cosine, linear, constant"),
        ({"resume": True, "overwrite": True}, "resume and overwrite contradict"),
        ({"merge_lora": True}, "merge_lora needs lora=True"),
        ({"eval_data": "x.jsonl", "eval_fraction": 0.1}, "eval_data or eval_fraction, not both"),
        ({"identity_only": True, "identity_fraction": 0.0}, "identity_only needs identity_fraction > 0"),
        ({"base_model": ""}, "base_model must be a non-empty path or id"),
    ],
)
def test_settings_are_checked(override, message):
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig(**{"data": "d.jsonl", "base_model": "m", "output_dir": "o", **override})


def test_official_recipe_is_the_default():
    c = TrainConfig(data="d.jsonl", base_model="m", output_dir="o")
    assert (c.max_length, c.epochs, c.learning_rate, c.lr_scheduler, c.warmup_ratio, c.weight_decay) == (
        2048,
        3.0,
        2e-5,
        "cosine",
        0.03,
        0.0,
    )
    assert (c.adam_beta1, c.adam_beta2, c.batch_size, c.gradient_accumulation_steps) == (0.9, 0.95, 4, 8)
    assert (c.bf16, c.gradient_checkpointing, c.identity_fraction, c.template) == (
        None,
        True,
        0.2,
        "aligner-v1",
    )


def test_report_to():
    assert report_to("none") == "none"
    assert report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert report_to("auto") in ("none", ["tensorboard"], ["wandb"], ["tensorboard", "wandb"])


def test_bad_records_fail_before_the_model_loads(tmp_path, base_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"question": "Q", "answer": "A"}) + "\n")
    with pytest.raises(TrainingDataError, match="line 2: missing field 'correction'"):
        train_aligner(small(base_dir / "does-not-exist", data, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_train_resume_and_output_rules(tmp_path, base_dir, data_file):
    import torch
    from safetensors.torch import load_file

    first = tmp_path / "first"
    out = train_aligner(small(base_dir, data_file, first))
    # 6 identity records padded to 8 = 2 steps, then 24 records = 6 steps
    assert sorted(p.name for p in (first / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-3",
        "checkpoint-6",
        "checkpoint-8",
    ]
    recorded = json.loads((out / "aligner_config.json").read_text())
    assert recorded["template"] == "aligner-general" and recorded["records"]["identity"] == 6
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert (out / "identity" / "model.safetensors").is_file()
    assert json.loads((out / "identity" / "aligner_config.json").read_text())["stage"] == "identity"
    aligner = Aligner.from_pretrained(out, max_new_tokens=8)
    assert aligner.template.name == "aligner-general"
    aligner.correct(RECORDS[0]["question"], RECORDS[0]["answer"])

    with pytest.raises(TrainConfigError, match="holds an earlier training run"):
        train_aligner(small(base_dir, data_file, first))

    # A run killed after step 3: only its first checkpoints are left. Resuming ends where the full run did.
    second = tmp_path / "second"
    shutil.copytree(first, second)
    for name in ("checkpoint-6", "checkpoint-8"):
        shutil.rmtree(second / "checkpoints" / name)
    (second / "model.safetensors").unlink()
    with pytest.raises(TrainConfigError, match="differ from those of the run checkpointed"):
        train_aligner(small(base_dir, data_file, second, resume=True, seed=2))
    train_aligner(small(base_dir, data_file, second, resume=True))
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    steps = [
        m["step"] for m in map(json.loads, (second / "metrics.jsonl").read_text().splitlines()) if "loss" in m
    ]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 4, 5, 6, 7, 8]  # the copied log, then the resumed steps appended

    train_aligner(small(base_dir, data_file, second, overwrite=True, max_steps=1, save_identity=False))
    assert sorted(p.name for p in (second / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (second / "identity").exists()


def test_python_objects_identity_only_and_no_warm_up(tmp_path, data_file):
    tokenizer = build_tokenizer()
    out = train_aligner(
        small(
            "unused", data_file, tmp_path / "ident", identity_only=True, identity_fraction=0.5, max_steps=2
        ),
        model=build_model(tokenizer),
        tokenizer=tokenizer,
    )
    recorded = json.loads((out / "aligner_config.json").read_text())
    assert [s["name"] for s in recorded["stages"]] == ["identity"] and recorded["base_model"] == "unused"
    out = train_aligner(
        small("unused", data_file, tmp_path / "plain", identity_fraction=0.0, max_steps=1),
        model=build_model(tokenizer),
        tokenizer=tokenizer,
    )
    assert [s["name"] for s in json.loads((out / "aligner_config.json").read_text())["stages"]] == [
        "correction"
    ]


@pytest.fixture
def cli():
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def _root() -> None:
        pass

    register(app)
    return lambda *args: CliRunner().invoke(app, ["train", *map(str, args)], env={"COLUMNS": "250"})


def test_cli_help_lists_the_settings(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for flag in (
        "--base-model",
        "--output",
        "--template",
        "--identity-fraction",
        "--lora",
        "--epochs",
        "--lr",
        "--max-length",
        "--resume",
        "--merge-lora",
        "--eval-fraction",
        "--overlong",
        "--no-bf16",
    ):
        assert flag in result.output


def test_cli_trains_and_reports_errors(cli, tmp_path, base_dir, data_file):
    result = cli(
        data_file,
        "--base-model",
        base_dir,
        "-o",
        tmp_path / "out",
        "--template",
        "aligner-general",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--max-length",
        "512",
        "--report-to",
        "none",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "Aligner.from_pretrained(" in result.output
    assert Aligner.from_pretrained(tmp_path / "out").template.name == "aligner-general"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q", "answer": " ", "correction": "C"}\n')
    result = cli(bad, "-m", base_dir, "-o", tmp_path / "out2")
    assert result.exit_code == 2 and "line 1: empty 'answer'" in result.output
    result = cli(data_file, "-m", base_dir, "-o", tmp_path / "out", "--resume", "--overwrite")
    assert result.exit_code == 2 and "resume and overwrite contradict" in result.output


def test_aligner_cli_has_the_train_command():
    """``aligner_core.cli`` wires the command in with ``aligner_core.training.register(app)``."""
    from aligner_core.cli import main

    assert main(["train", "--help"]) == 0
