"""The offline demo: correct the bundled sample pairs with the packaged default model."""

from __future__ import annotations

import difflib
import json
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..jobs.choice import EngineChoice
    from ..progress import Progress, ProgressCallback


def sample_pairs() -> list[tuple[str, str]]:
    """The bundled sample question-answer pairs (some wrong, some rude, one fine)."""
    text = resources.files("aligner_core").joinpath("data/samples.jsonl").read_text(encoding="utf-8")
    return [(r["question"], r["answer"]) for r in map(json.loads, filter(str.strip, text.splitlines()))]


def word_diff(original: str, corrected: str) -> Any:
    """A rich Text of the word changes, ``[-removed-]`` in red and ``{+added+}`` in green (git word-diff
    markers, so the diff still reads when colours are off)."""
    from rich.text import Text

    a, b = original.split(), corrected.split()
    out = Text()
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(" ".join(a[i1:i2]) + " ")
            continue
        if op in ("delete", "replace"):
            out.append("[-" + " ".join(a[i1:i2]) + "-] ", style="red")
        if op in ("insert", "replace"):
            out.append("{+" + " ".join(b[j1:j2]) + "+} ", style="green")
    return out


def run_demo(
    model: str | None = None,
    *,
    max_new_tokens: int = 96,
    max_batch_tokens: int | None = None,
    choice: EngineChoice | None = None,
    progress: ProgressCallback | Progress | None = None,
) -> int:
    """Load the model, correct the samples in batches with a live progress bar, print each side by side.

    ``choice`` runs the demo on another engine (``aligner demo --server URL`` or ``--engine vllm``);
    ``progress`` also receives the bar's counts (rows, tokens) as the model decodes.
    """
    from rich.console import Console
    from rich.table import Table

    from ..jobs.choice import EngineChoice
    from ..loading import DEFAULT_MODEL

    console = Console()
    choice = choice or EngineChoice(model=model)
    name = choice.model or ("the server's model" if choice.server else DEFAULT_MODEL)
    start = time.perf_counter()
    with console.status(
        f"Loading {name} on the {choice.where} (the transformers engine dequantizes a GGUF once, ~20 s)"
    ):
        aligner = choice.load(max_new_tokens=max_new_tokens, max_batch_tokens=max_batch_tokens)
    loaded = time.perf_counter() - start
    console.print(
        f"Loaded [bold]{aligner.name}[/] on the [bold]{aligner.engine.name}[/] engine in {loaded:.1f}s, "
        f"template [bold]{aligner.template.name}[/]"
    )
    pairs = sample_pairs()
    start = time.perf_counter()
    results = aligner.correct_batch(pairs, show_progress=True, progress=progress)
    elapsed = time.perf_counter() - start
    for i, c in enumerate(results, 1):
        table = Table(title=f"{i}. {c.question}", show_lines=True, expand=True, title_justify="left")
        table.add_column("original", ratio=1)
        table.add_column("correction", ratio=1)
        table.add_row(c.original, c.text)
        console.print(table)
        console.print("  changes:", word_diff(c.original, c.text))
        console.print(
            f"  changed={c.changed} similarity={c.similarity:.2f} tokens={c.prompt_tokens}+{c.completion_tokens} "
            f"finish={c.finish_reason}\n"
        )
    changed = sum(c.changed for c in results)
    tokens = sum(c.completion_tokens for c in results)
    console.print(
        f"[bold]{len(results)} pairs corrected in {elapsed:.1f}s[/] ({tokens / elapsed:.1f} new tokens/s), "
        f"{changed} changed. Note: the default model is a 135M instruct model prompted as an untrained "
        "corrector; load a trained Aligner (e.g. aligner/aligner-7b-v1.0) for real corrections."
    )
    return 0
