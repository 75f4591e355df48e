"""The ``aligner`` command line: ``aligner correct``, ``aligner demo``, ``aligner templates``."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from .options import (
    ApiKeyOpt,
    ConcurrencyOpt,
    EngineOpt,
    ModelOpt,
    RetriesOpt,
    ServerOpt,
    TimeoutOpt,
    engine_choice,
)

app = typer.Typer(
    name="aligner",
    help="Correct any LLM's answers with an Aligner model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def versions() -> str:
    """The library's version, those of the packages it runs on (read from metadata) and the engine the default
    model runs on here (``engines.choosing``: torch is imported only to look for an accelerator)."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for dist, label in (("llm-aligner", "llm-aligner"), ("torch", "torch"), ("transformers", "transformers")):
        try:
            parts.append(f"{label} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{label} (not installed)")
    from ..engines.choosing import default_engine_line

    parts.append(default_engine_line())
    return ", ".join(parts)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(versions())
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what is loaded and chosen.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the versions and exit."
        ),
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@app.command()
def correct(
    input: Annotated[
        str,
        typer.Argument(
            help="Records to correct: .jsonl, .json, .csv, .tsv or .parquet file, a datasets folder, or - (JSON lines "
            "on stdin)."
        ),
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="JSONL file to write, or - for stdout.")],
    model: ModelOpt = None,
    template: Annotated[
        str | None, typer.Option(help="Prompt template (default: recorded in the model, else chosen for it).")
    ] = None,
    question_field: Annotated[str, typer.Option(help="Field holding the question.")] = "question",
    answer_field: Annotated[str, typer.Option(help="Field holding the answer to correct.")] = "answer",
    output_field: Annotated[str, typer.Option(help="Field to write the correction into.")] = "correction",
    batch_tokens: Annotated[
        int | None,
        typer.Option(
            "--batch-tokens",
            min=1,
            help="Token budget of one padded batch (default: 16384 on CPU, derived from free memory on a GPU).",
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest correction, in tokens.")] = 1024,
    chunk_size: Annotated[
        int, typer.Option(min=1, help="Records corrected and written durably at a time.")
    ] = 64,
    on_overflow: Annotated[
        str, typer.Option(help="'error' or 'truncate' for answers longer than the context.")
    ] = "error",
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1, mps (default: best available).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Skip records already in OUTPUT.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    server: ServerOpt = None,
    engine: EngineOpt = "auto",
    api_key: ApiKeyOpt = None,
    timeout: TimeoutOpt = 60.0,
    max_retries: RetriesOpt = 3,
    max_concurrency: ConcurrencyOpt = 64,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Spread the file over a Ray cluster (starts a local one if none).",
            rich_help_panel="Ray",
        ),
    ] = False,
    address: Annotated[
        str | None,
        typer.Option(
            "--address", help="Ray cluster address, e.g. auto or ray://host:10001.", rich_help_panel="Ray"
        ),
    ] = None,
    replicas: Annotated[
        int,
        typer.Option(
            "--replicas", min=1, help="Aligner replicas (one model each) for --ray.", rich_help_panel="Ray"
        ),
    ] = 1,
) -> None:
    """Correct a JSONL file of question-answer records into OUTPUT, durably and resumably."""
    from ..errors import AlignerError, EngineUnavailableError
    from ..jobs.files import correct_jsonl

    if resume and overwrite:
        raise typer.BadParameter("--resume and --overwrite contradict each other: pick one")
    if on_overflow not in ("error", "truncate"):
        raise typer.BadParameter(f"--on-overflow must be 'error' or 'truncate', got {on_overflow!r}")
    if not ray and (address is not None or replicas != 1):
        raise typer.BadParameter("--address and --replicas apply to --ray runs: add --ray")
    from ..jobs.jsonl import check_output
    from ..jobs.records import check_input

    try:  # before any model loads
        check_input(input)
        check_output(output, resume=resume, overwrite=overwrite)
    except AlignerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if ray and (input == "-" or output == "-"):
        raise typer.BadParameter("--ray reads and writes files: it cannot use - (stdin/stdout)")
    choice = engine_choice(
        model=model,
        server=server,
        engine=engine,
        api_key=api_key,
        timeout=timeout,
        max_retries=max_retries,
        max_concurrency=max_concurrency,
    )
    load_options = {
        "template": template,
        "device": device,
        "dtype": dtype,
        "max_new_tokens": max_new_tokens,
        "max_batch_tokens": batch_tokens,
        "on_overflow": on_overflow,
    }
    job_options = {
        "question_field": question_field,
        "answer_field": answer_field,
        "output_field": output_field,
        "resume": resume,
        "overwrite": overwrite,
        "chunk_size": chunk_size,
        "show_progress": progress,
    }
    try:
        if ray:
            from ..jobs.ray import correct_file_ray

            stats = correct_file_ray(
                input,
                output,
                choice,
                load_options=load_options,
                replicas=replicas,
                address=address,
                **job_options,
            )
        else:
            aligner = choice.load(**load_options)
            try:
                stats = correct_jsonl(aligner, input, output, **job_options)
            finally:
                aligner.close()
    except EngineUnavailableError as exc:
        typer.echo(
            f"error: {exc}\nthe records corrected so far are saved in {output}: run the same command with "
            "--resume once the engine is back",
            err=True,
        )
        raise typer.Exit(3) from exc
    except AlignerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    where = "stdout" if output == "-" else output
    typer.echo(
        f"wrote {stats.written} records to {where} ({stats.changed} changed, {stats.failed} failed"
        + (f", {stats.skipped} already done" if stats.skipped else "")
        + f") on the {choice.where}"
        + (f" x {replicas} Ray replica(s)" if ray else ""),
        err=True,
    )
    if stats.failed:
        typer.echo(f"failed: {stats.describe_failures()} (see aligner_error in those records)", err=True)
    if not stats.complete:
        typer.echo(f"error: read {stats.read} records but wrote {stats.skipped + stats.written}", err=True)
        raise typer.Exit(1)
    if stats.failed:
        raise typer.Exit(1)


@app.command()
def demo(
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest correction, in tokens.")] = 96,
    server: ServerOpt = None,
    engine: EngineOpt = "auto",
    api_key: ApiKeyOpt = None,
) -> None:
    """Correct the bundled sample pairs offline and show each original beside its correction."""
    from ..errors import AlignerError
    from .demo import run_demo

    try:
        run_demo(
            max_new_tokens=max_new_tokens,
            choice=engine_choice(model=model, server=server, engine=engine, api_key=api_key),
        )
    except AlignerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def templates() -> None:
    """List the registered prompt templates."""
    from ..templates import list_templates

    for name in list_templates():
        typer.echo(name)


def _register_subcommands() -> None:
    """Commands that live with their feature: ``train``, ``train-inspector``, ``eval``, ``pairs``, ``cache``,
    ``serve`` (imports stay cheap: each loads its dependencies when it runs)."""
    from aligner_serve.cli import register as register_serve  # a sibling package of the same distribution

    from ..training import register as register_train
    from ..training.inspector_cli import register as register_train_inspector
    from .cache import register as register_cache
    from .evaluate import register as register_eval
    from .pairs import register as register_pairs

    register_train(app)
    register_train_inspector(app)
    register_eval(app)
    register_pairs(app)
    register_cache(app)
    register_serve(app)


_register_subcommands()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aligner`` command; returns the exit code."""
    try:
        app(args=argv, prog_name="aligner")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
