"""One bootstrapping round: the upstream model answers, the Aligner corrects, pairs are written."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OutputExistsError, TemplateError
from ..jobs.jsonl import chunked, open_resumable, write_durably
from ..jobs.records import SUFFIXES, iter_items
from ..local_chat import LocalChat
from ..progress import token_postfix
from .build import PairStats, write_pairs

if TYPE_CHECKING:
    from ..aligner import Aligner

#: Anything that answers a list of questions: a ``TransformersUpstream``, a function, or a LangChain chat model.
Upstream = Callable[[Sequence[str]], Sequence[str]]


class TransformersUpstream(LocalChat):
    """A local causal LM answering questions through its chat template, in planned batches.

    ``LocalChat`` built from ``(model, tokenizer)``: decoding is greedy unless ``do_sample=True``; other
    ``generation`` options are those of ``aligner_core.GenerationParams``. A model without a chat
    template needs ``prompt_format`` (e.g. ``"Question: {question}\\nAnswer:"``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_new_tokens: int = 256,
        system: str | None = None,
        prompt_format: str | None = None,
        max_batch_tokens: int | None = None,
        **generation: Any,
    ) -> None:
        from ..engines.local import TransformersEngine

        if prompt_format is None and not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "the upstream model's tokenizer has no chat template: pass prompt_format='...{question}...'"
            )
        super().__init__(
            TransformersEngine(model, tokenizer, max_batch_tokens=max_batch_tokens),
            max_new_tokens=max_new_tokens,
            system=system,
            prompt_format=prompt_format,
            **generation,
        )

    @property
    def backend(self) -> Any:
        """The engine (older name)."""
        return self.engine

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, model: str | os.PathLike[str], *, device: str | None = None, dtype: Any = "auto", **kwargs: Any
    ) -> TransformersUpstream:
        """Load the upstream model from a hub id, local directory or GGUF file."""
        from ..loading import load_model

        loaded, tokenizer, _ = load_model(model, device=device, dtype=dtype)
        return cls(loaded, tokenizer, **kwargs)


def _answers(upstream: Any, questions: Sequence[str]) -> list[Any]:
    if hasattr(upstream, "batch") and hasattr(upstream, "invoke") and not isinstance(upstream, LocalChat):
        replies = upstream.batch(list(questions), return_exceptions=True)
        return [r if isinstance(r, BaseException) else _message_text(r).strip() for r in replies]
    answers = list(upstream(questions))
    if len(answers) != len(questions):
        raise ValueError(f"the upstream returned {len(answers)} answers for {len(questions)} questions")
    return answers


def _message_text(message: Any) -> str:
    content = getattr(message, "content", message)
    if isinstance(content, str):
        return content
    return "".join(
        p if isinstance(p, str) else str(p.get("text", "")) for p in content if isinstance(p, (str, dict))
    )


def iter_prompts(
    path: str | os.PathLike[str], *, question_field: str = "question", skip: int = 0
) -> Iterator[str | Exception]:
    """Questions from records (``question_field`` of each: any format of ``aligner_core.jobs.records``, ``-`` for
    stdin) or from a text file (one per line)."""
    p = Path(path)
    if str(path) == "-" or p.suffix.lower() in SUFFIXES or p.is_dir():
        for item in iter_items(path, skip=skip):
            record = item.record
            if isinstance(record, Exception):
                yield record
            elif not isinstance(record.get(question_field), str) or not record[question_field].strip():
                yield ValueError(f"{item.where}: no {question_field!r} string")
            else:
                yield record[question_field]
        return
    with open(p, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    yield from lines[skip:]


@dataclass
class RoundResult:
    """A bootstrapping round: the records file (question, answer, correction) and the pair counts."""

    records_path: Path
    pairs_path: Path
    pairs: PairStats
    skipped: int = 0
    generated: int = 0
    failed: int = 0


def generate_round(
    prompts_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    upstream: Upstream | Any,
    aligner: Aligner,
    records_path: str | os.PathLike[str] | None = None,
    question_field: str = "question",
    resume: bool = False,
    overwrite: bool = False,
    chunk_size: int = 32,
    show_progress: bool = True,
    pair_options: dict[str, Any] | None = None,
    **generation: Any,
) -> RoundResult:
    """Answer every prompt with ``upstream``, correct each answer with ``aligner``, write pairs.

    The records (``question``, ``answer``, ``correction``, ``aligner``) go to ``records_path``
    (default: next to ``out_path``, ``<name>.records.jsonl``) in durable chunks, so ``resume``
    continues a killed round; the pairs file is then rebuilt from all records.
    ``generation`` options apply to the Aligner.
    """
    from tqdm.auto import tqdm

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    out = Path(out_path)
    records = Path(records_path) if records_path is not None else out.with_name(out.stem + ".records.jsonl")
    if out.exists() and not (resume or overwrite):
        raise OutputExistsError(
            f"{out} exists: pass --resume to continue the round or --overwrite to start again"
        )
    f, done = open_resumable(records, resume=resume, overwrite=overwrite)
    result = RoundResult(records_path=records, pairs_path=out, pairs=PairStats())
    result.skipped = done
    prompts = list(iter_prompts(prompts_path, question_field=question_field, skip=result.skipped))
    with (
        f,
        tqdm(
            total=result.skipped + len(prompts),
            initial=result.skipped,
            desc="Answering and correcting",
            unit="prompt",
            disable=not show_progress,
        ) as bar,
    ):
        for chunk in chunked(prompts, chunk_size):
            _run_chunk(chunk, f, upstream, aligner, {**generation, "progress": token_postfix(bar)}, result)
            bar.update(len(chunk))
    result.pairs = write_pairs(records, out, overwrite=True, **(pair_options or {}))
    return result


def _run_chunk(
    chunk: list[str | Exception],
    f: Any,
    upstream: Any,
    aligner: Aligner,
    generation: dict[str, Any],
    result: RoundResult,
) -> None:
    rows: list[dict[str, Any]] = []
    live = [i for i, q in enumerate(chunk) if isinstance(q, str)]
    answers = _answers(upstream, [chunk[i] for i in live]) if live else []  # type: ignore[misc]
    by_index = dict(zip(live, answers))
    to_correct = [i for i in live if isinstance(by_index[i], str) and by_index[i].strip()]
    fixes = (
        aligner.correct_batch(
            [(chunk[i], by_index[i]) for i in to_correct], return_exceptions=True, **generation
        )
        if to_correct
        else []
    )
    fixed = dict(zip(to_correct, fixes))
    for i, question in enumerate(chunk):
        if isinstance(question, Exception):
            rows.append({"question": None, "answer": None, "correction": None, "error": str(question)})
            result.failed += 1
            continue
        answer = by_index[i]
        if isinstance(answer, BaseException) or not str(answer).strip():
            why = (
                f"upstream failed: {answer}"
                if isinstance(answer, BaseException)
                else "upstream answer is empty"
            )
            rows.append(
                {
                    "question": question,
                    "answer": None if isinstance(answer, BaseException) else answer,
                    "correction": None,
                    "error": why,
                }
            )
            result.failed += 1
            continue
        fix = fixed[i]
        if isinstance(fix, BaseException):
            rows.append(
                {
                    "question": question,
                    "answer": answer,
                    "correction": None,
                    "error": f"aligner failed: {fix}",
                }
            )
            result.failed += 1
            continue
        rows.append({"question": question, "answer": answer, "correction": fix.text, "aligner": fix.stats()})
        result.generated += 1
    write_durably(f, rows)


__all__ = ["RoundResult", "TransformersUpstream", "Upstream", "generate_round", "iter_prompts"]
