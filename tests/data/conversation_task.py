"""A multi-turn correction task: the right correction depends on a turn two turns back.

The user says where they live; a turn later they ask for the capital of "my country". The answer
says "your country" and names a city (a wrong capital for a third, a rude remark added for a third,
right for a third); the correction names the country said earlier in the conversation and its
capital, drops the remark and copies the rest. Without the history the country is unknowable.
"""

from __future__ import annotations

import random

from tests.data.correction_task import CAPITALS, KINDS, RUDE, THINGS

GREETINGS = ["Hi there.", "Hello!", "Good morning.", "Hey."]
REPLIES = ["Nice to meet you.", "Hello! How can I help?", "Good to hear from you.", "Welcome!"]


def make_record(rng: random.Random, kind: str) -> dict:
    country = rng.choice(sorted(CAPITALS))
    city = CAPITALS[country]
    first, second = rng.sample(THINGS, 2)
    tail = f"It is known for {first} and {second}."
    history = [
        {"role": "user", "content": f"{rng.choice(GREETINGS)} I live in {country}."},
        {"role": "assistant", "content": rng.choice(REPLIES)},
    ]
    correction = f"The capital of {country} is {city}. {tail}"
    said = f"The capital of your country is {city}. {tail}"
    if kind == "wrong":
        wrong = rng.choice(sorted(set(CAPITALS.values()) - {city}))
        answer = f"The capital of your country is {wrong}. {tail}"
    elif kind == "rude":
        rude = rng.choice(RUDE)
        answer = f"{rude} {said}" if rng.random() < 0.5 else f"{said} {rude}"
    else:
        answer = said
    return {
        "chat_history": history,
        "question": "What is the capital of my country?",
        "answer": answer,
        "correction": correction,
        "kind": kind,
    }


def make_split(n_train: int = 400, n_test: int = 48, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)`` records; no held-out (history, answer) appears in training."""
    rng = random.Random(seed)
    train = [make_record(rng, KINDS[i % 3]) for i in range(n_train)]
    seen = {(r["chat_history"][0]["content"], r["answer"]) for r in train}
    test: list[dict] = []
    while len(test) < n_test:
        r = make_record(rng, KINDS[len(test) % 3])
        key = (r["chat_history"][0]["content"], r["answer"])
        if key not in seen:
            seen.add(key)
            test.append(r)
    return train, test


def corpus() -> list[str]:
    """Extra tokenizer text: the conversation words and how ``aligner-chat-history`` renders a history."""
    from aligner_core.history import normalize_history
    from aligner_core.templates import get_template

    rng = random.Random(2)
    template = get_template("aligner-chat-history")
    texts = []
    for kind in KINDS * 100:
        r = make_record(rng, kind)
        texts.append(
            template.format(
                question=r["question"], answer=r["answer"], history=normalize_history(r["chat_history"])
            )
        )
    return texts
