"""One call of transformers' ``generate`` for the local engine: left-padded inputs, the ``GenerationConfig`` a
call's parameters ask for, stop strings, and a streamer that hands each new token to a sink.

The engine uses it where its own decoding loop does not run (no draft, sampling, a model the loop does not
support); benchmarks use the same pieces to time ``generate`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..base import GenerationParams, GenerationRequest


def pad_left(engine: Any, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``input_ids`` and ``attention_mask`` on the engine's device."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), engine.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
    return ids.to(engine.device), mask.to(engine.device)


def generation_config(engine: Any, params: GenerationParams, max_new_tokens: int) -> Any:
    """The ``GenerationConfig`` for ``params`` (greedy unless ``do_sample``), with the engine's EOS and pad ids."""
    from transformers import GenerationConfig

    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": params.do_sample,
        "eos_token_id": engine.eos_token_ids or None,
        "pad_token_id": engine.pad_token_id,
    }
    if params.do_sample:
        options.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
    if params.repetition_penalty != 1.0:
        options["repetition_penalty"] = params.repetition_penalty
    return GenerationConfig(**options)


def generate_tokens(
    engine: Any, batch: Sequence[GenerationRequest], params: GenerationParams, streamer: Any = None
) -> list[list[int]]:
    """The new tokens of each request (padding and EOS included, as ``generate`` returns them)."""
    input_ids, attention_mask = pad_left(engine, [r.prompt_ids for r in batch])
    extra: dict[str, Any] = {}
    if params.stop:
        extra = {"stop_strings": list(params.stop), "tokenizer": engine.tokenizer}
    if streamer is not None:
        extra["streamer"] = streamer
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=generation_config(engine, params, max(r.max_new_tokens for r in batch)),
            **extra,
        )
    return out[:, input_ids.shape[1] :].tolist()


def sink_streamer(sink: Callable[[list[int]], None]) -> Any:
    """A transformers streamer that hands each step's new tokens to ``sink`` (the prompt it is shown first is not)."""
    from transformers.generation.streamers import BaseStreamer

    class _Sink(BaseStreamer):
        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # generate() first hands over the prompt
                self.prompt_seen = True
                return
            sink([int(t) for t in value.reshape(-1).tolist()])

        def end(self) -> None:
            pass

    return _Sink()


__all__ = ["generate_tokens", "generation_config", "pad_left", "sink_streamer"]
