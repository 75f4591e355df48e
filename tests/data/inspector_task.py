"""A synthetic inspection task small enough to learn on a CPU in seconds.

The question asks for a distance, a weight, a duration or a temperature; the answer gives a number with a
unit. The answer is aligned (label 1) when the unit measures what was asked (``kilometres`` for "How far"),
misaligned (0) when it measures something else (``kilograms`` for "How far"). The label depends on the
question *and* the answer, so no single word gives it away. Held-out records use subjects never seen in
training, so the classifier must have learnt the relation, not the records. Deterministic under its seed.
"""

from __future__ import annotations

import random

UNITS = {
    "distance": ["kilometres", "metres", "miles"],
    "weight": ["kilograms", "grams", "pounds"],
    "time": ["seconds", "minutes", "hours"],
    "temperature": ["degrees Celsius", "degrees Fahrenheit", "kelvin"],
}
QUESTIONS = {
    "distance": "How far is it to the {subject}?",
    "weight": "How heavy is the {subject}?",
    "time": "How long does the {subject} take?",
    "temperature": "How hot is the {subject}?",
}
SUBJECTS = [
    "bridge",
    "station",
    "market",
    "castle",
    "harbour",
    "tower",
    "river",
    "garden",
    "museum",
    "island",
    "library",
    "stadium",
    "temple",
    "village",
    "forest",
    "lake",
    "airport",
    "school",
    "factory",
    "farm",
    "theatre",
    "palace",
    "mountain",
    "beach",
    "valley",
    "bakery",
    "hospital",
    "canal",
    "desert",
    "cave",
]
#: Subjects only the held-out records use.
HELD_OUT_SUBJECTS = SUBJECTS[-8:]


def make_record(rng: random.Random, label: int, subjects: list[str]) -> dict[str, object]:
    kind = rng.choice(sorted(UNITS))
    subject = rng.choice(subjects)
    other = rng.choice(sorted(set(UNITS) - {kind}))
    unit = rng.choice(UNITS[kind] if label else UNITS[other])
    number = rng.randint(2, 950)
    return {
        "question": QUESTIONS[kind].format(subject=subject),
        "answer": f"The {subject} is about {number} {unit}.",
        "label": label,
    }


def make_split(n_train: int = 320, n_test: int = 80, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)``: balanced labels; held-out subjects never appear in training."""
    rng = random.Random(seed)
    seen = SUBJECTS[: -len(HELD_OUT_SUBJECTS)]
    train = [make_record(rng, i % 2, seen) for i in range(n_train)]
    test = [make_record(rng, i % 2, HELD_OUT_SUBJECTS) for i in range(n_test)]
    return train, test


def corpus() -> list[str]:
    rng = random.Random(1)
    return [f"{r['question']} {r['answer']}" for r in (make_record(rng, i % 2, SUBJECTS) for i in range(600))]


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on the task's words: most words are one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>", "<sep>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A <sep> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 1), ("<sep>", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", sep_token="<sep>"
    )


def build_classifier(tokenizer, *, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A randomly initialised two-label Llama sequence classifier (fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=2,
        id2label={0: "misaligned", 1: "aligned"},
        label2id={"misaligned": 0, "aligned": 1},
    )
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)
