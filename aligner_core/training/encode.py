"""Records to token ids: prompt (exact template) + correction + EOS, loss only on correction + EOS.

The prompt is encoded exactly as the inference path encodes it (``Aligner.prepare``: the template's
string, ``add_special_tokens=template.add_special_tokens`` for the BOS convention); the correction is
encoded on its own without special tokens and the ids are concatenated, so the label mask starts at
the exact first correction token whatever the tokenizer does at the seam. As in the official code,
the correction follows the prompt directly (for ``aligner-v1`` right after ``ASSISTANT:``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..context import Context, context_texts
from ..errors import TemplateError
from ..history import History, history_texts, render_prompt
from ..plaintext import encode_plain, encode_text, holds_special
from ..templates import Template, TextTemplate
from .data import Record, TrainingDataError, problems_message

logger = logging.getLogger("aligner_core.training")

#: Label of tokens that carry no loss (PyTorch's cross-entropy ``ignore_index``).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One tokenized training sequence; ``prompt_length`` tokens of it carry no loss."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    where: str

    def as_features(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "labels": self.labels}


@dataclass
class EncodeReport:
    """What encoding did to a set of records under the overlong policy."""

    kept: int = 0
    overlong: int = 0
    dropped: int = 0
    truncated: int = 0
    with_unknown_tokens: list[str] = field(default_factory=list)


class ExampleEncoder:
    """Turns ``(question, answer, correction)`` into ``Example``s with the template's exact prompt."""

    def __init__(self, tokenizer: Any, template: Template) -> None:
        if tokenizer.eos_token_id is None:
            raise TemplateError(
                "the base tokenizer has no EOS token, so a trained Aligner could not learn to stop: "
                "use a tokenizer that defines eos_token"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.unk_token_id = getattr(tokenizer, "unk_token_id", None)

    def prompt(self, question: str, answer: str, history: History = (), context: Context = ()) -> str:
        """The prompt string, rendered by the same code as inference (``history.render_prompt``)."""
        return render_prompt(self.template, question, answer, history, context)

    def _encode(
        self, text: str, *, add_special_tokens: bool, split_special_tokens: bool = False
    ) -> list[int]:
        return encode_text(
            self.tokenizer,
            text,
            add_special_tokens=add_special_tokens,
            split_special_tokens=split_special_tokens,
        )

    def prompt_ids(
        self, question: str, answer: str, history: History = (), context: Context = ()
    ) -> list[int]:
        """Token ids of the prompt, exactly as ``Aligner.prepare`` encodes it for generation (special-token
        strings in the question, answer, history or context as plain text, see ``aligner_core.plaintext``)."""
        text = self.prompt(question, answer, history, context)
        special = self.template.add_special_tokens
        texts = (question, answer, *history_texts(history), *context_texts(context))
        if holds_special(self.tokenizer, texts):
            ids = encode_plain(self._encode, text, texts, add_special_tokens=special)
            if ids is not None:
                return ids
        return self._encode(text, add_special_tokens=special)

    def correction_ids(self, correction: str) -> list[int]:
        """Token ids of the correction (special-token strings as plain text) followed by EOS."""
        plain = holds_special(self.tokenizer, (correction,))
        return [
            *self._encode(correction, add_special_tokens=False, split_special_tokens=plain),
            self.eos_token_id,
        ]

    def encode(
        self,
        question: str,
        answer: str,
        correction: str,
        where: str = "",
        history: History = (),
        context: Context = (),
    ) -> Example:
        prompt = self.prompt_ids(question, answer, history, context)
        target = self.correction_ids(correction)
        return Example([*prompt, *target], [IGNORE_INDEX] * len(prompt) + target, len(prompt), where)

    def encode_many(self, records: Sequence[Record]) -> list[Example]:
        """``encode`` for many records, with one batched tokenizer call per side."""
        if not records:
            return []
        prompts = [self.prompt(r.question, r.answer, r.history, r.context) for r in records]
        special = self.template.add_special_tokens
        prompt_ids = self.tokenizer(prompts, add_special_tokens=special)["input_ids"]
        target_ids = self.tokenizer([r.correction for r in records], add_special_tokens=False)["input_ids"]
        out = []
        for r, p, t in zip(records, prompt_ids, target_ids):
            texts = (r.question, r.answer, r.correction, *history_texts(r.history), *context_texts(r.context))
            if holds_special(self.tokenizer, texts):  # rare: the exact, slower path
                p = self.prompt_ids(r.question, r.answer, r.history, r.context)
                t = self.correction_ids(r.correction)[:-1]
            t = [*t, self.eos_token_id]
            out.append(Example([*p, *t], [IGNORE_INDEX] * len(p) + t, len(p), r.where))
        return out

    def check_template(self) -> None:
        """Raise ``TemplateError`` when the tokenizer cannot encode the template's own text faithfully."""
        sample = self.prompt("What is two plus two?", "Two plus two is four.")
        ids = self.prompt_ids("What is two plus two?", "Two plus two is four.")
        if not ids:
            raise TemplateError(f"template {self.template.name!r} encodes to no tokens with this tokenizer")
        if self.unk_token_id is not None and self.unk_token_id in ids:
            bad = _unknown_chars(self.tokenizer, sample)
            raise TemplateError(
                f"the base tokenizer cannot encode template {self.template.name!r}: it maps "
                f"{bad or 'part of it'} to the unknown token {self.tokenizer.unk_token!r}; pick another template "
                "(--template) or another base model"
            )
        if isinstance(self.template, TextTemplate):
            decoded = self.tokenizer.decode(ids, skip_special_tokens=True)
            if _squash(decoded) != _squash(sample):
                raise TemplateError(
                    f"the base tokenizer does not round-trip template {self.template.name!r}: "
                    f"{sample!r} decodes back as {decoded!r}; pick another template or base model"
                )


def encode_records(
    encoder: ExampleEncoder, records: Sequence[Record], *, max_length: int, policy: str, what: str = "records"
) -> tuple[list[Example], EncodeReport]:
    """Encode ``records`` and apply the overlong ``policy`` (``error``, ``drop`` or ``truncate``).

    ``error`` raises ``TrainingDataError`` listing every record over ``max_length``; ``drop`` leaves
    them out; ``truncate`` cuts the correction's tail (and its EOS), dropping records whose prompt
    alone does not leave room for one correction token.
    """
    report = EncodeReport()
    kept: list[Example] = []
    too_long: list[str] = []
    for ex in encoder.encode_many(records):
        if encoder.unk_token_id is not None and encoder.unk_token_id in ex.input_ids[ex.prompt_length :]:
            report.with_unknown_tokens.append(ex.where)
        if len(ex.input_ids) <= max_length:
            kept.append(ex)
            continue
        report.overlong += 1
        too_long.append(
            f"{ex.where}: {len(ex.input_ids)} tokens (prompt {ex.prompt_length}) > max_length {max_length}"
        )
        if policy == "truncate" and ex.prompt_length < max_length:
            kept.append(
                Example(ex.input_ids[:max_length], ex.labels[:max_length], ex.prompt_length, ex.where)
            )
            report.truncated += 1
        elif policy != "error":
            report.dropped += 1
    if too_long and policy == "error":
        raise TrainingDataError(
            problems_message(
                f"{len(too_long)} of {len(records)} {what} are longer than max_length={max_length}", too_long
            )
            + "\nraise --max-length, or pass --overlong drop (leave them out) or --overlong truncate (cut the correction)"
        )
    if report.with_unknown_tokens:
        logger.warning(
            "%d %s have corrections with characters the tokenizer maps to its unknown token (first: %s)",
            len(report.with_unknown_tokens),
            what,
            ", ".join(report.with_unknown_tokens[:3]),
        )
    if report.dropped or report.truncated:
        logger.warning(
            "%d %s over max_length=%d: %d dropped, %d truncated",
            report.overlong,
            what,
            max_length,
            report.dropped,
            report.truncated,
        )
    report.kept = len(kept)
    return kept, report


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _unknown_chars(tokenizer: Any, text: str) -> str:
    unk = tokenizer.unk_token_id
    bad = sorted({ch for ch in set(text) if unk in tokenizer(ch, add_special_tokens=False)["input_ids"]})
    return ", ".join(repr(c) for c in bad[:10])


__all__ = ["IGNORE_INDEX", "EncodeReport", "Example", "ExampleEncoder", "encode_records"]
