"""The reward-model judge on a tiny LlamaForSequenceClassification built from config (real forward passes)."""

import pytest

from aligner_core.evaluation import Comparison, Judge, RewardModelJudge
from tests.conftest import build_tokenizer


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    d = tmp_path_factory.mktemp("tiny-reward")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def judge(reward_dir):
    return RewardModelJudge.from_pretrained(reward_dir, device="cpu", batch_size=2)


ITEMS = [
    Comparison("What is 12 times 12?", "124.", "12 times 12 is 144."),
    Comparison("How many legs does a spider have?", "Six, like all insects.", "Spiders have eight legs."),
    Comparison(
        "Why is the sky blue?", "It reflects the sea.", "Air scatters blue sunlight more than red light."
    ),
]


def test_scores_are_real_and_independent_of_batching(judge):
    pairs = [(it.question, text) for it in ITEMS for text in (it.original, it.correction)]
    together = judge.score(pairs)
    alone = [judge.score([p])[0] for p in pairs]
    assert together == pytest.approx(alone, abs=1e-4)  # padding and length sorting change nothing
    assert len(set(round(s, 4) for s in together)) > 1
    assert isinstance(judge, Judge) and judge.dimensions == ("reward",)


def test_preference_follows_scores_with_a_tie_margin(judge, reward_dir):
    verdicts = judge.judge_batch(ITEMS)
    for v in verdicts:
        orig, corr = v["reward"].scores
        assert v["reward"].outcome == ("win" if corr > orig else "loss" if corr < orig else "tie")
    flipped = RewardModelJudge(judge.model, judge.tokenizer, dimension="harmlessness", higher_is_better=False)
    for a, b in zip(verdicts, flipped.judge_batch(ITEMS)):
        assert {a["reward"].outcome, b["harmlessness"].outcome} in ({"win", "loss"}, {"tie"})
    lenient = RewardModelJudge(judge.model, judge.tokenizer, tie_margin=1e6)
    assert {v["reward"].outcome for v in lenient.judge_batch(ITEMS)} == {"tie"}
    assert (
        lenient.outcome(0.0, 0.5) == "tie"
        and judge.outcome(0.0, 0.5) == "win"
        and judge.outcome(1.0, 0.5) == "loss"
    )


def test_rendering_and_bad_options(judge):
    text = judge.render("Q?", "A.")
    assert "<|user|>Q?" in text and "<|assistant|>A." in text  # the tokenizer's chat template
    custom = RewardModelJudge(
        judge.model, judge.tokenizer, text_format=lambda q, a: f"Human: {q} Assistant: {a}"
    )
    assert custom.render("Q?", "A.") == "Human: Q? Assistant: A."
    assert isinstance(custom.score([("Q?", "A.")])[0], float)
    with pytest.raises(ValueError, match="tie_margin"):
        RewardModelJudge(judge.model, judge.tokenizer, tie_margin=-1)
    with pytest.raises(ValueError, match="label"):
        RewardModelJudge(judge.model, judge.tokenizer, label=3)


def test_missing_reward_model_is_a_clear_error(tmp_path):
    from aligner_core import ModelLoadError

    with pytest.raises(ModelLoadError, match="sequence-classification"):
        RewardModelJudge.from_pretrained(tmp_path / "nope", device="cpu")
