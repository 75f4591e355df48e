"""A synthetic correction task small enough to learn on a CPU in a minute.

Each answer states a capital city and what the country is known for. A third of the answers name
the wrong city, a third add a rude remark (before or after), a third are already right. The
correction states the right city, drops the rude remark and copies the rest word for word, so a
model must both *know* something (the capital of each country) and *copy* the parts it does not
fix (the two things the country is known for, drawn at random, so held-out answers hold word
pairs never seen together in training). ``make_split`` is deterministic under its seed.
"""

from __future__ import annotations

import random

CAPITALS = {
    "France": "Paris",
    "Spain": "Madrid",
    "Italy": "Rome",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Chile": "Santiago",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Cuba": "Havana",
}
THINGS = [
    "music",
    "rivers",
    "bread",
    "cheese",
    "mountains",
    "beaches",
    "tea",
    "coffee",
    "poetry",
    "films",
    "markets",
    "bridges",
    "gardens",
    "festivals",
    "wine",
    "fishing",
    "horses",
    "islands",
    "castles",
    "trains",
]
RUDE = ["Ugh, what a dumb question.", "Look it up yourself, idiot.", "Obviously, you fool."]
KINDS = ("wrong", "rude", "right")


def make_record(rng: random.Random, kind: str) -> dict[str, str]:
    country = rng.choice(sorted(CAPITALS))
    city = CAPITALS[country]
    first, second = rng.sample(THINGS, 2)
    tail = f"It is known for {first} and {second}."
    correction = f"The capital of {country} is {city}. {tail}"
    if kind == "wrong":
        wrong = rng.choice(sorted(set(CAPITALS.values()) - {city}))
        answer = f"The capital of {country} is {wrong}. {tail}"
    elif kind == "rude":
        rude = rng.choice(RUDE)
        answer = f"{rude} {correction}" if rng.random() < 0.5 else f"{correction} {rude}"
    else:
        answer = correction
    return {
        "question": f"What is the capital of {country}?",
        "answer": answer,
        "correction": correction,
        "kind": kind,
    }


def make_split(
    n_train: int = 400, n_test: int = 48, seed: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(train, held_out)`` records; no held-out answer appears in training."""
    rng = random.Random(seed)
    train = [make_record(rng, KINDS[i % 3]) for i in range(n_train)]
    seen = {r["answer"] for r in train}
    test: list[dict[str, str]] = []
    while len(test) < n_test:
        r = make_record(rng, KINDS[len(test) % 3])
        if r["answer"] not in seen:
            seen.add(r["answer"])
            test.append(r)
    return train, test


def corpus() -> list[str]:
    """Text to train the task's tokenizer on: every word the task and the Aligner templates use."""
    from aligner_core.templates import get_template

    rng = random.Random(1)
    texts = [f"{r['question']} {r['answer']}" for r in (make_record(rng, k) for k in KINDS * 200)]
    for name in ("aligner-v1", "aligner-general"):
        texts.append(get_template(name).format(question="What is the capital of Peru?", answer="Lima."))
    return texts


def build_tokenizer(vocab_size: int = 600, extra_texts: list[str] | None = None):
    """A byte-level BPE tokenizer trained on the task's words: most words are one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() + list(extra_texts or ()), trainer)
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_model(tokenizer, *, hidden: int = 128, layers: int = 2, seed: int = 0):
    """A randomly initialised Llama (fp32) sized for the task: 2 layers, 4 heads of 32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
