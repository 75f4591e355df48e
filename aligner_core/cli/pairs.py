"""``aligner pairs``: preference pairs for DPO from corrections, or a whole bootstrapping round."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..pairs.build import DEFAULT_MAX_SIMILARITY, DEFAULT_PROMPT_FORMAT
from .options import (
    ApiKeyOpt,
    ConcurrencyOpt,
    EngineChoice,
    EngineOpt,
    ModelOpt,
    RetriesOpt,
    ServerOpt,
    TimeoutOpt,
    engine_choice,
)


def pairs_command(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="JSONL of DPO pairs (prompt, chosen, rejected) to write.")
    ],
    input: Annotated[
        Path | None,
        typer.Argument(
            help="JSONL of question, answer, correction (e.g. from `aligner correct`).", dir_okay=False
        ),
    ] = None,
    max_similarity: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Drop pairs whose correction is at least this similar to the answer (1.0: drop only unchanged).",
        ),
    ] = DEFAULT_MAX_SIMILARITY,
    conversational: Annotated[
        bool, typer.Option("--conversational", help="Write message lists (TRL applies the chat template).")
    ] = False,
    prompt_format: Annotated[
        str, typer.Option(help="Prompt of standard pairs; must contain {question}.")
    ] = DEFAULT_PROMPT_FORMAT,
    system: Annotated[
        str | None, typer.Option(help="System prompt put before each prompt (and given to the upstream).")
    ] = None,
    question_field: Annotated[str, typer.Option(help="Field holding the question.")] = "question",
    answer_field: Annotated[str, typer.Option(help="Field holding the upstream answer.")] = "answer",
    correction_field: Annotated[str, typer.Option(help="Field holding the correction.")] = "correction",
    generate: Annotated[
        bool,
        typer.Option(
            "--generate", help="Run the whole round: --upstream answers --prompts, the Aligner corrects."
        ),
    ] = False,
    upstream: Annotated[
        str | None, typer.Option(help="With --generate: the upstream model (hub id, local dir or GGUF).")
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="With --generate: questions, JSONL (question field) or text (one per line).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    records: Annotated[
        Path | None,
        typer.Option(
            help="With --generate: where the answered and corrected records go (default OUTPUT.records.jsonl)."
        ),
    ] = None,
    upstream_max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Longest upstream answer, in tokens.")
    ] = 256,
    model: ModelOpt = None,
    template: Annotated[
        str | None, typer.Option(help="The Aligner's prompt template (default: chosen for it).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest correction, in tokens.")] = 1024,
    batch_tokens: Annotated[
        int | None,
        typer.Option(
            "--batch-tokens",
            min=1,
            help="Token budget of one padded batch (default: 16384 on CPU, derived from free memory on a GPU).",
        ),
    ] = None,
    chunk_size: Annotated[
        int, typer.Option(min=1, help="Prompts answered, corrected and written durably at a time.")
    ] = 32,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1, mps (default: best available).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = "auto",
    resume: Annotated[
        bool, typer.Option("--resume", help="With --generate: continue a killed round.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    server: ServerOpt = None,
    engine: EngineOpt = "transformers",
    api_key: ApiKeyOpt = None,
    timeout: TimeoutOpt = 60.0,
    max_retries: RetriesOpt = 3,
    max_concurrency: ConcurrencyOpt = 64,
) -> None:
    """Write DPO preference pairs (correction = chosen, upstream answer = rejected) for TRL's DPOTrainer."""
    from ..errors import AlignerError
    from ..pairs.build import write_pairs

    if resume and overwrite:
        raise typer.BadParameter("--resume and --overwrite contradict each other: pick one")
    options: dict[str, Any] = {
        "max_similarity": max_similarity,
        "conversational": conversational,
        "system": system,
        "prompt_format": prompt_format,
        "question_field": question_field,
        "answer_field": answer_field,
        "correction_field": correction_field,
    }
    if max_similarity <= 0:
        raise typer.BadParameter("--max-similarity must be above 0")
    try:
        if generate:
            if input is not None:
                raise typer.BadParameter(
                    "with --generate the records come from --prompts: drop the input file"
                )
            if upstream is None or prompts is None:
                raise typer.BadParameter("--generate needs --upstream M and --prompts FILE")
            result = _generate(
                prompts,
                output,
                upstream=upstream,
                records=records,
                system=system,
                template=template,
                choice=engine_choice(
                    model=model,
                    server=server,
                    engine=engine,
                    api_key=api_key,
                    timeout=timeout,
                    max_retries=max_retries,
                    max_concurrency=max_concurrency,
                ),
                max_new_tokens=max_new_tokens,
                upstream_max_new_tokens=upstream_max_new_tokens,
                batch_tokens=batch_tokens,
                chunk_size=chunk_size,
                device=device,
                dtype=dtype,
                resume=resume,
                overwrite=overwrite,
                progress=progress,
                question_field=question_field,
                pair_options={
                    **options,
                    "question_field": "question",
                    "answer_field": "answer",
                    "correction_field": "correction",
                },
            )
            typer.echo(
                f"answered and corrected {result.generated} prompts into {result.records_path} ({result.failed} failed"
                + (f", {result.skipped} already done" if result.skipped else "")
                + ")",
                err=True,
            )
            stats = result.pairs
        else:
            if input is None:
                raise typer.BadParameter(
                    "pass the records file (IN.jsonl), or --generate --upstream M --prompts FILE"
                )
            if not input.is_file():
                raise typer.BadParameter(f"no such file: {input}")
            if resume:
                raise typer.BadParameter(
                    "--resume applies to --generate rounds; building pairs from a file is quick"
                )
            stats = write_pairs(input, output, overwrite=overwrite, **options)
    except (AlignerError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"wrote {stats.describe()} to {output}", err=True)


def _generate(
    prompts: Path,
    output: Path,
    *,
    upstream: str,
    records: Path | None,
    system: str | None,
    choice: EngineChoice,
    template: str | None,
    max_new_tokens: int,
    upstream_max_new_tokens: int,
    batch_tokens: int | None,
    chunk_size: int,
    device: str | None,
    dtype: str,
    resume: bool,
    overwrite: bool,
    progress: bool,
    question_field: str,
    pair_options: dict[str, Any],
) -> Any:
    from ..jobs.jsonl import check_output
    from ..pairs.generate import TransformersUpstream, generate_round

    check_output(output, resume=resume, overwrite=overwrite)  # before any model loads
    answerer = TransformersUpstream.from_pretrained(
        upstream,
        device=device,
        dtype=dtype,
        max_new_tokens=upstream_max_new_tokens,
        system=system,
        max_batch_tokens=batch_tokens,
    )
    aligner = choice.load(
        template=template,
        device=device,
        dtype=dtype,
        max_new_tokens=max_new_tokens,
        max_batch_tokens=batch_tokens,
    )
    return generate_round(
        prompts,
        output,
        upstream=answerer,
        aligner=aligner,
        records_path=records,
        question_field=question_field,
        resume=resume,
        overwrite=overwrite,
        chunk_size=chunk_size,
        show_progress=progress,
        pair_options=pair_options,
    )


def register(app: typer.Typer) -> None:
    """Add the ``pairs`` command to the ``aligner`` app."""
    app.command("pairs", no_args_is_help=True)(pairs_command)
