"""A reward model as judge: score each answer, prefer the higher score, tie within a margin."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from .judges import Comparison, Outcome, Verdict

TextFormat = Callable[[str, str], str]


class RewardModelJudge:
    """Judge corrections with a transformers sequence-classification model (a reward or cost model).

    Each answer is scored on its own as ``(question, answer)``; the correction wins when its
    score beats the original's by more than ``tie_margin``. A cost model (lower is better, as
    PKU's harmlessness cost models) takes ``higher_is_better=False``. The model judges one
    ``dimension``. Texts are rendered with the tokenizer's chat template when it has one, else
    as ``"{question}\\n\\n{answer}"``; pass ``text_format(question, answer)`` for a model trained
    on another format.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        dimension: str = "reward",
        tie_margin: float = 0.0,
        higher_is_better: bool = True,
        batch_size: int = 8,
        max_length: int = 2048,
        label: int = 0,
        text_format: TextFormat | None = None,
        name: str | None = None,
    ) -> None:
        if tie_margin < 0:
            raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        num_labels = int(getattr(model.config, "num_labels", 1))
        if not 0 <= label < num_labels:
            raise ValueError(f"label must index one of the model's {num_labels} outputs, got {label}")
        self.model = model
        self.tokenizer = tokenizer
        self.dimension = dimension
        self.dimensions = (dimension,)
        self.tie_margin = float(tie_margin)
        self.higher_is_better = higher_is_better
        self.batch_size = batch_size
        self.max_length = max_length
        self.label = label
        self.text_format = text_format
        self.name = name or str(getattr(model, "name_or_path", "") or type(model).__name__)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # the model finds each row's last token by it

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str],
        *,
        device: str | None = None,
        dtype: Any = "auto",
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> RewardModelJudge:
        """Load a sequence-classification reward model from a hub id or a local directory."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..errors import ModelLoadError
        from ..loading import resolve_device, resolve_dtype

        target = resolve_device(device)
        load_kwargs: dict[str, Any] = {
            "dtype": resolve_dtype(dtype, target),
            "trust_remote_code": trust_remote_code,
        }
        if not allow_pickle:
            load_kwargs["use_safetensors"] = True
        try:
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(model), trust_remote_code=trust_remote_code)
            loaded = AutoModelForSequenceClassification.from_pretrained(os.fspath(model), **load_kwargs)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"could not load the reward model {os.fspath(model)!r}: {exc}\n(it must be a transformers "
                "sequence-classification model; with HF_HUB_OFFLINE=1 only local files and the cache are used)"
            ) from exc
        kwargs.setdefault("name", os.fspath(model))
        return cls(loaded.to(target).eval(), tokenizer, **kwargs)

    def __repr__(self) -> str:
        return f"RewardModelJudge(name={self.name!r}, dimension={self.dimension!r})"

    def render(self, question: str, answer: str) -> str:
        """The text the reward model scores for one answer."""
        if self.text_format is not None:
            return self.text_format(question, answer)
        if getattr(self.tokenizer, "chat_template", None):
            conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return f"{question}\n\n{answer}"

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Reward of each ``(question, answer)``, in input order (longest texts batched first)."""
        import torch

        texts = [self.render(q, a) for q, a in pairs]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        scores = [0.0] * len(texts)
        device = next(self.model.parameters()).device
        chat = bool(self.text_format is None and getattr(self.tokenizer, "chat_template", None))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in batch],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    add_special_tokens=not chat,  # a chat template already holds its special tokens
                ).to(device)
                logits = self.model(**enc).logits.float()
                for i, value in zip(batch, logits[:, self.label].tolist()):
                    scores[i] = float(value)
        return scores

    def outcome(self, original_score: float, correction_score: float) -> Outcome:
        """Win, tie or loss of the correction given both scores."""
        delta = correction_score - original_score
        if not self.higher_is_better:
            delta = -delta
        if abs(delta) <= self.tie_margin:
            return "tie"
        return "win" if delta > 0 else "loss"

    def judge(self, question: str, original: str, correction: str) -> dict[str, Verdict]:
        """Judge one correction."""
        return self.judge_batch([Comparison(question, original, correction)])[0]

    def judge_batch(
        self, items: Sequence[Comparison], *, on_result: Callable[[int], None] | None = None
    ) -> list[dict[str, Verdict]]:
        """Score originals and corrections in batches; one verdict per item."""
        flat = [(it.question, text) for it in items for text in (it.original, it.correction)]
        scores = self.score(flat)
        out = []
        for i in range(len(items)):
            s_orig, s_corr = scores[2 * i], scores[2 * i + 1]
            out.append(
                {self.dimension: Verdict(outcome=self.outcome(s_orig, s_corr), scores=(s_orig, s_corr))}
            )
            if on_result is not None:
                on_result(i)
        return out


__all__ = ["RewardModelJudge"]
