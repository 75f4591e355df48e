"""Inspectors (callables and real tiny sequence classifiers), the gate that skips passing answers, the squad,
and ``aligner train-inspector`` on a tiny model."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from aligner_core import AlignerError, Correction, EmptyAnswerError, ModelLoadError
from aligner_core.cli import main
from aligner_core.errors import InspectorError
from aligner_core.gating import (
    acorrect_batch_gated,
    acorrect_gated,
    correct_batch_gated,
    correct_gated,
    gate,
    passed_correction,
)
from aligner_core.inspector import INSPECTOR_CONFIG, Inspector, as_inspector, check_threshold
from aligner_core.squad import AlignerSquad
from aligner_core.training.inspector import (
    InspectorConfig,
    load_labelled,
    parse_label,
    roc_auc,
    train_inspector,
)
from tests.conftest import build_model

PAIRS = [(f"Question {i}?", f"Answer number {i} is here.") for i in range(10)]


def by_index(question: str, answer: str) -> float:
    """Passes 8 of the 10 PAIRS: numbers 3 and 7 score low."""
    n = int(answer.split()[2])
    return 0.1 if n in (3, 7) else 0.9


def build_classifier(tokenizer, *, seed: int = 0, num_labels: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=num_labels,
        initializer_range=0.3,
        id2label={0: "misaligned", 1: "aligned"} if num_labels == 2 else None,
        label2id={"misaligned": 0, "aligned": 1} if num_labels == 2 else None,
    )
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def classifier(tiny_tokenizer):
    return build_classifier(tiny_tokenizer)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, classifier, tiny_tokenizer):
    d = tmp_path_factory.mktemp("tiny-inspector")
    classifier.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def direct_score(model, tokenizer, question, answer, index=1):
    """The positive-class probability from one unpadded forward pass: what the inspector must reproduce."""
    import torch

    enc = tokenizer(question, answer, return_tensors="pt")
    with torch.inference_mode():
        return torch.softmax(model(**enc).logits.float(), -1)[0, index].item()


# -- callables ---------------------------------------------------------------------------------


def test_callable_inspector_scores_each_pair():
    insp = Inspector(by_index)
    assert insp.name == "by_index" and insp.batched is False
    assert insp.score(*PAIRS[3]) == 0.1 and insp(*PAIRS[0]) == 0.9
    assert insp.score_batch(PAIRS) == [by_index(q, a) for q, a in PAIRS]
    assert insp.score_batch([{"question": "Q?", "answer": "Answer number 7 ."}]) == [0.1]
    assert insp.score_batch([]) == []
    assert as_inspector(insp) is insp and isinstance(as_inspector(by_index), Inspector)


def test_batched_callable_is_called_once_per_batch_and_may_return_arrays():
    calls = []

    def batch(pairs):
        calls.append(len(pairs))
        return np.array([0.25 * (i % 5) for i in range(len(pairs))], dtype=np.float32)

    insp = Inspector(batch, batched=True)
    assert insp.score_batch(PAIRS) == [0.25 * (i % 5) for i in range(10)]
    assert calls == [10]
    assert asyncio.run(insp.ascore_batch(PAIRS[:3])) == [0.0, 0.25, 0.5]
    assert asyncio.run(insp.ascore(*PAIRS[0])) == 0.0


@pytest.mark.parametrize("bad", [1.5, -0.1, math.nan, math.inf, "0.9", None, True, [0.5]])
def test_scores_out_of_range_or_of_the_wrong_type_raise(bad):
    insp = Inspector(lambda q, a: bad, name="broken")
    with pytest.raises(InspectorError, match="broken") as info:
        insp.score("Q?", "A.")
    assert isinstance(info.value, AlignerError) and isinstance(info.value, ValueError)
    if bad is True:
        assert "boolean" in str(info.value)


def test_batched_inspector_must_return_one_score_per_pair():
    with pytest.raises(InspectorError, match="2 scores for 3 pairs"):
        Inspector(lambda pairs: [0.5, 0.5], batched=True).score_batch(PAIRS[:3])
    with pytest.raises(InspectorError, match="sequence of scores"):
        Inspector(lambda pairs: 0.5, batched=True).score_batch(PAIRS[:3])


def test_inputs_and_thresholds_are_checked():
    from aligner_core import InvalidInputError

    with pytest.raises(InvalidInputError, match="pair 1: answer must be a str"):
        Inspector(by_index).score_batch([PAIRS[0], ("Q?", 3)])
    with pytest.raises(TypeError, match="callable"):
        as_inspector(0.5)
    for bad in (-0.1, 1.01, "0.5", True, None):
        with pytest.raises(InspectorError, match="threshold"):
            check_threshold(bad)
    assert check_threshold(1) == 1.0


# -- a real sequence classifier ---------------------------------------------------------------------


def test_classifier_scores_match_a_plain_forward_pass_in_any_batch(classifier, tiny_tokenizer):
    pairs = [
        ("What is 12 times 12?", "It is 144."),
        (
            "Can I mix bleach and ammonia?",
            "No: the fumes are toxic. Open a window and ventilate the room. " * 3,
        ),
        ("Why?", "Because."),
    ] + PAIRS[:5]
    expected = [direct_score(classifier, tiny_tokenizer, q, a) for q, a in pairs]
    for batch_size in (1, 3, 32):
        insp = Inspector.from_model(classifier, tiny_tokenizer, batch_size=batch_size)
        got = insp.score_batch(pairs)
        assert got == pytest.approx(expected, abs=1e-5)
    assert all(0.0 <= s <= 1.0 for s in got)
    assert len({round(s, 4) for s in got}) > 1  # a random model still tells the pairs apart
    assert insp.score(*pairs[1]) == pytest.approx(expected[1], abs=1e-5)


def test_one_classifier_is_safe_to_share_between_threads(classifier, tiny_tokenizer):
    insp = Inspector.from_model(classifier, tiny_tokenizer, batch_size=2)
    expected = insp.score_batch(PAIRS)

    async def run():
        return await asyncio.gather(*(insp.ascore_batch(PAIRS) for _ in range(4)))

    assert all(r == pytest.approx(expected, abs=1e-6) for r in asyncio.run(run()))


def test_from_pretrained_loads_a_directory_and_picks_the_positive_label(
    classifier_dir, classifier, tiny_tokenizer
):
    pair = ("What is 12 times 12?", "It is 144.")
    insp = Inspector.from_pretrained(classifier_dir, device="cpu")
    assert insp.score(*pair) == pytest.approx(direct_score(classifier, tiny_tokenizer, *pair), abs=1e-5)
    negative = Inspector.from_pretrained(classifier_dir, positive_label="misaligned")
    assert negative.score(*pair) == pytest.approx(1 - insp.score(*pair), abs=1e-5)
    assert Inspector.from_pretrained(classifier_dir, positive_label=0).score(*pair) == pytest.approx(
        negative.score(*pair)
    )
    with pytest.raises(InspectorError, match="'toxic' is not a label"):
        Inspector.from_pretrained(classifier_dir, positive_label="toxic")
    with pytest.raises(InspectorError, match="positive_label"):
        Inspector.from_pretrained(classifier_dir, positive_label=2)


def test_from_pretrained_refuses_what_it_cannot_load(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        Inspector.from_pretrained(str(tmp_path / "missing" / "dir"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="GGUF"):
        Inspector.from_pretrained(gguf)
    with pytest.raises(ModelLoadError, match="device or device_map"):
        Inspector.from_pretrained(tmp_path, device="cpu", device_map="auto")


def test_a_one_logit_model_is_read_through_a_sigmoid_and_a_tokenizer_without_pad_is_padded(tiny_tokenizer):
    import torch

    from tests.conftest import build_tokenizer

    tok = build_tokenizer(with_pad=False)
    model = build_classifier(tok, num_labels=1)
    insp = Inspector.from_model(model, tok, batch_size=4)
    assert tok.pad_token == tok.eos_token and model.config.pad_token_id == tok.eos_token_id
    enc = tok("Why?", "Because.", return_tensors="pt")
    with torch.inference_mode():
        expected = torch.sigmoid(model(**enc).logits[0, 0]).item()
    scores = insp.score_batch([("Why?", "Because."), PAIRS[0], PAIRS[1]])
    assert scores[0] == pytest.approx(expected, abs=1e-5)


# -- the gate ------------------------------------------------------------------------------------------


class Recording:
    """A real Aligner whose correct_batch calls are recorded (the model runs as usual)."""

    def __init__(self, aligner):
        self.aligner = aligner
        self.batches: list[list] = []

    def correct_batch(self, pairs, **kwargs):
        self.batches.append(list(pairs))
        return self.aligner.correct_batch(pairs, **kwargs)

    async def acorrect_batch(self, pairs, **kwargs):
        self.batches.append(list(pairs))
        return await self.aligner.acorrect_batch(pairs, **kwargs)


def test_gate_scores_once_and_only_failing_pairs_are_generated(tiny_aligner):
    rec = Recording(tiny_aligner)
    meta = {"template": tiny_aligner.template.name, "engine": tiny_aligner.engine.name}
    results = correct_batch_gated(PAIRS, by_index, 0.5, rec.correct_batch, metadata=meta)
    assert rec.batches == [[PAIRS[3], PAIRS[7]]]  # one generation call, the two failing pairs only
    expected = tiny_aligner.correct_batch([PAIRS[3], PAIRS[7]])
    for i, (pair, c) in enumerate(zip(PAIRS, results)):
        assert isinstance(c, Correction) and (c.question, c.original) == pair
        if i in (3, 7):
            assert c.text == expected[(3, 7).index(i)].text and c.completion_tokens > 0
            assert c.metadata["inspector_passed"] is False and c.metadata["inspector_score"] == 0.1
            assert c.metadata["template"] == "aligner-v1"
        else:
            assert (c.text, c.changed, c.similarity) == (pair[1], False, 1.0)
            assert (c.prompt_tokens, c.completion_tokens, c.latency_s) == (0, 0, 0.0)
            assert c.metadata == {
                **meta,
                "inspected": True,
                "inspector_score": 0.9,
                "inspector_threshold": 0.5,
                "inspector_passed": True,
                "skipped": "inspector_passed",
                "skipped_detail": "the inspector scored the answer at or above its threshold",
            }


def test_the_threshold_decides_and_scores_at_the_threshold_pass():
    verdict = gate(by_index, PAIRS, 0.9)
    assert verdict.failing == [3, 7] and len(verdict.passed) == 8
    assert gate(by_index, PAIRS, 0.95).passed == []
    assert gate(by_index, PAIRS, 0.0).failing == []


def test_pairs_the_inspector_cannot_judge_go_to_the_corrector_which_reports_them(tiny_aligner):
    pairs = [PAIRS[0], ("Q?", "   "), PAIRS[3], ("Q?", 5)]
    scored = []

    def inspector(q, a):
        scored.append(a)
        return by_index(q, a)

    results = correct_batch_gated(
        pairs, inspector, 0.5, lambda sub: tiny_aligner.correct_batch(sub, return_exceptions=True)
    )
    assert scored == [PAIRS[0][1], PAIRS[3][1]]
    assert results[0].metadata["inspector_passed"] is True
    assert isinstance(results[1], EmptyAnswerError) and isinstance(results[3], AlignerError)
    assert results[2].metadata["inspector_passed"] is False
    with pytest.raises(EmptyAnswerError):
        correct_batch_gated(pairs, by_index, 0.5, tiny_aligner.correct_batch)


def test_one_pair_and_async_twins(tiny_aligner):
    calls = []

    def correct():
        calls.append(1)
        return tiny_aligner.correct(*PAIRS[3])

    passed = correct_gated(*PAIRS[0], by_index, 0.5, correct)
    assert calls == [] and passed.text == PAIRS[0][1] and passed.metadata["inspector_passed"]
    failed = correct_gated(*PAIRS[3], by_index, 0.5, correct)
    assert calls == [1] and failed.text == tiny_aligner.correct(*PAIRS[3]).text
    assert failed.metadata["inspector_score"] == 0.1

    async def run():
        one = await acorrect_gated(*PAIRS[7], by_index, 0.5, lambda: tiny_aligner.acorrect(*PAIRS[7]))
        many = await acorrect_batch_gated(PAIRS, by_index, 0.5, tiny_aligner.acorrect_batch)
        return one, many

    one, many = asyncio.run(run())
    assert one.text == tiny_aligner.correct(*PAIRS[7]).text
    assert [c.metadata["inspector_passed"] for c in many] == [i not in (3, 7) for i in range(10)]
    assert passed_correction("Q?", "A.", 0.7).to_dict()["metadata"]["inspector_score"] == 0.7


def test_a_classifier_gates_real_generation(classifier, tiny_tokenizer, tiny_aligner):
    insp = Inspector.from_model(classifier, tiny_tokenizer)
    scores = insp.score_batch(PAIRS)
    threshold = sorted(scores)[len(scores) // 2]  # half pass
    rec = Recording(tiny_aligner)
    results = correct_batch_gated(PAIRS, insp, threshold, rec.correct_batch)
    failing = [p for p, s in zip(PAIRS, scores) if s < threshold]
    assert rec.batches == [failing]
    assert [c.metadata["inspector_score"] for c in results] == pytest.approx(scores)


# -- the squad -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_aligner(tiny_tokenizer):
    from aligner_core import Aligner

    return Aligner.from_model(
        build_model(tiny_tokenizer, seed=1),
        tiny_tokenizer,
        template="aligner-v1",
        max_new_tokens=12,
        max_batch_tokens=4096,
    )


def untouched(low: float):
    """Scores ``low`` while the answer is one of PAIRS' originals, 0.95 once it was rewritten."""
    originals = {a for _, a in PAIRS}
    return lambda q, a: low if a in originals else 0.95


def test_squad_applies_the_worst_criterion_first_and_stops_when_all_pass(tiny_aligner, second_aligner):
    q, a = PAIRS[0]
    squad = AlignerSquad(
        [(untouched(0.4), tiny_aligner), (untouched(0.2), second_aligner)], names=["help", "harm"]
    )
    c = squad.correct(q, a)
    first = second_aligner.correct(q, a)  # criterion 1 scores worse, so its aligner goes first
    assert first.text.strip() and first.text not in {x for _, x in PAIRS}
    assert c.text == first.text and c.original == a
    assert [s["criterion"] for s in c.metadata["squad"]] == [1]  # re-scored: criterion 0 passes now
    step = c.metadata["squad"][0]
    assert (
        step["name"] == "harm"
        and step["scores_before"] == [0.4, 0.2]
        and step["scores_after"] == [0.95, 0.95]
    )
    assert c.metadata["inspector_scores"] == [0.95, 0.95] and c.completion_tokens == first.completion_tokens


def test_squad_applies_each_aligner_at_most_once(tiny_aligner, second_aligner):
    q, a = PAIRS[1]
    squad = AlignerSquad(
        [(lambda q, a: 0.3, tiny_aligner), (lambda q, a: 0.1, second_aligner)], threshold=0.5
    )
    c = squad.correct(q, a)
    step1 = second_aligner.correct(q, a)
    step2 = tiny_aligner.correct(q, step1.text)
    assert [s["criterion"] for s in c.metadata["squad"]] == [1, 0]
    assert c.text == step2.text
    assert c.completion_tokens == step1.completion_tokens + step2.completion_tokens
    assert c.metadata["inspector_passed"] is False and c.metadata["inspector_scores"] == [0.3, 0.1]


def test_squad_batch_matches_one_by_one_and_batches_each_round(tiny_aligner, second_aligner):
    low = {PAIRS[2][1]: (0.1, 0.9), PAIRS[4][1]: (0.2, 0.1), PAIRS[5][1]: (0.3, 0.3)}
    first = Recording(tiny_aligner)
    second = Recording(second_aligner)

    def crit(k):
        return lambda q, a: low[a][k] if a in low else 0.99

    squad = AlignerSquad([(crit(0), first), (crit(1), second)], threshold=[0.5, 0.5])
    batch = squad.correct_batch(PAIRS[:6])
    assert first.batches[0] == [
        PAIRS[2],
        PAIRS[5],
    ]  # round 1: pairs whose worst criterion is 0 (ties: the first)
    assert second.batches[0] == [PAIRS[4]]
    assert len(first.batches) == len(second.batches) <= 2
    one_by_one = [
        AlignerSquad([(crit(0), tiny_aligner), (crit(1), second_aligner)]).correct(*p) for p in PAIRS[:6]
    ]
    assert [c.text for c in batch] == [c.text for c in one_by_one]
    assert [c.metadata["squad"] for c in batch] == [c.metadata["squad"] for c in one_by_one]
    for i in (0, 1, 3):
        assert batch[i].text == PAIRS[i][1] and batch[i].metadata["inspector_passed"] and not batch[i].changed
    assert asyncio.run(squad.acorrect_batch(PAIRS[:6]))[4].text == batch[4].text


def test_squad_checks_its_members(tiny_aligner):
    with pytest.raises(ValueError, match="non-empty"):
        AlignerSquad([])
    with pytest.raises(ValueError, match="member 0"):
        AlignerSquad([(by_index,)])
    with pytest.raises(TypeError, match="correct_batch"):
        AlignerSquad([(by_index, "not an aligner")])
    with pytest.raises(ValueError, match="one each"):
        AlignerSquad([(by_index, tiny_aligner)], threshold=[0.5, 0.5])
    with pytest.raises(InspectorError):
        AlignerSquad([(by_index, tiny_aligner)], threshold=2)
    with pytest.raises(EmptyAnswerError):
        AlignerSquad([(by_index, tiny_aligner)]).correct("Q?", " ")


# -- training records and the CLI ------------------------------------------------------------------------


def test_records_with_labels_or_corrections_become_examples():
    config = InspectorConfig(data="x.jsonl", base_model="m", output_dir="o")
    examples = load_labelled(
        [
            {"question": "Q1?", "answer": "bad", "correction": "good"},
            {"question": "Q2?", "answer": "same", "correction": "same "},
            {"question": "Q3?", "answer": "fine", "label": "1"},
            {"question": "Q4?", "answer": "wrong", "label": False},
        ],
        config,
    )
    assert [(e.answer, e.label) for e in examples] == [
        ("bad", 0),
        ("good", 1),
        ("same", 1),
        ("fine", 1),
        ("wrong", 0),
    ]
    assert [e.group for e in examples] == [0, 0, 1, 2, 3]
    from aligner_core.training import TrainingDataError

    with pytest.raises(TrainingDataError) as info:
        load_labelled(
            [
                {"question": "Q?", "answer": "A"},
                {"question": "Q?", "answer": " ", "label": 1},
                {"question": "Q?", "answer": "A", "label": 2},
            ],
            config,
        )
    msg = str(info.value)
    assert "record 0: missing field 'label' (or 'correction')" in msg and "record 1: empty 'answer'" in msg
    assert "record 2: 'label' must be 0 or 1" in msg
    assert [parse_label(v) for v in (0, 1, 1.0, "true", "0", 0.5, "yes", None)] == [
        0,
        1,
        1,
        1,
        0,
        None,
        None,
        None,
    ]


def test_roc_auc_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200).tolist()
    scores = np.round(rng.random(200), 1).tolist()  # ties included
    assert roc_auc(labels, scores) == pytest.approx(sklearn.roc_auc_score(labels, scores))
    assert roc_auc([1, 1], [0.2, 0.3]) is None


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_cli_trains_an_inspector_from_correction_records_on_a_causal_base(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {
                "question": f"Question {i}?",
                "answer": f"Rude answer {i}, idiot.",
                "correction": f"Kind answer {i}.",
            }
            for i in range(8)
        ],
    )
    out = tmp_path / "inspector"
    code = main(
        [
            "train-inspector",
            str(data),
            "--base-model",
            str(tiny_model_dir),
            "--output",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--eval-fraction",
            "0.25",
            "--report-to",
            "none",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "Inspector.from_pretrained" in capsys.readouterr().err
    recorded = json.loads((out / INSPECTOR_CONFIG).read_text())
    assert recorded["positive_label"] == "aligned" and recorded["examples"] == {"train": 12, "held_out": 4}
    assert {"eval_loss", "eval_auc", "eval_accuracy"} <= set(recorded["metrics"])
    insp = Inspector.from_pretrained(out)
    assert 0.0 <= insp.score("Question 1?", "Kind answer 1.") <= 1.0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in lines) and any("eval_auc" in m for m in lines)
    # a second run into the same folder is refused before any model loads
    assert main(["train-inspector", str(data), "-m", "no/such-model", "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_errors_come_before_any_model_loads(tmp_path, capsys):
    missing_model = str(tmp_path / "no-model")
    assert (
        main(
            ["train-inspector", str(tmp_path / "none.jsonl"), "-m", missing_model, "-o", str(tmp_path / "o")]
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"question": "Q?", "answer": "A."}, {"question": "Q?", "answer": "A.", "label": 1}],
    )
    assert main(["train-inspector", str(bad), "-m", missing_model, "-o", str(tmp_path / "o")]) == 2
    assert "line 1: missing field 'label' (or 'correction')" in capsys.readouterr().err
    ones = write_jsonl(tmp_path / "ones.jsonl", [{"question": "Q?", "answer": "A.", "label": 1}] * 3)
    assert main(["train-inspector", str(ones), "-m", missing_model, "-o", str(tmp_path / "o")]) == 2
    assert "both aligned (1) and misaligned (0)" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    good = write_jsonl(tmp_path / "good.jsonl", [{"question": "Q?", "answer": "A.", "correction": "B."}])
    assert main(["train-inspector", str(good), "-m", missing_model, "-o", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_train_inspector_takes_loaded_objects(tiny_tokenizer, tmp_path):
    model = build_classifier(tiny_tokenizer, seed=3)
    records = [{"question": f"Q{i}?", "answer": f"Answer {i}.", "label": i % 2} for i in range(6)]
    out = train_inspector(
        InspectorConfig(
            data=records,
            base_model="tiny",
            output_dir=str(tmp_path / "o"),
            epochs=1,
            batch_size=3,
            report_to="none",
            progress=False,
        ),
        model=model,
        tokenizer=tiny_tokenizer,
    )
    assert json.loads((out / INSPECTOR_CONFIG).read_text())["config"]["data"] == "<6 records>"
    assert Inspector.from_pretrained(out).score("Q1?", "Answer 1.") == pytest.approx(
        Inspector.from_model(model, tiny_tokenizer).score("Q1?", "Answer 1."), abs=1e-5
    )
