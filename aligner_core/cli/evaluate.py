"""``aligner eval``: judge corrections and write a report. Wire it with ``register(app)``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

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

logger = logging.getLogger("aligner_core")


def eval_command(
    input: Annotated[
        Path,
        typer.Argument(
            help="JSONL of question, answer and optionally correction.", exists=True, dir_okay=False
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Directory for verdicts.jsonl, report.md, summary.json and plots."
        ),
    ],
    judge: Annotated[
        str | None,
        typer.Option(
            "--judge",
            help="Chat model judging pairwise: hub id, local dir, GGUF, or provider:model (e.g. openai:gpt-4o).",
        ),
    ] = None,
    reward_model: Annotated[
        str | None,
        typer.Option("--reward-model", help="Sequence-classification reward model: hub id or local dir."),
    ] = None,
    dimensions: Annotated[
        str, typer.Option(help="Comma-separated dimensions for --judge.")
    ] = "helpfulness,harmlessness,honesty",
    rubrics: Annotated[
        Path | None,
        typer.Option(
            help="JSON object {dimension: rubric} adding or replacing rubrics.", exists=True, dir_okay=False
        ),
    ] = None,
    judge_max_tokens: Annotated[int, typer.Option(min=1, help="Longest judge reply, in tokens.")] = 64,
    concurrency: Annotated[int, typer.Option(min=1, help="Judge calls in flight at once (API judges).")] = 4,
    both_orders: Annotated[
        bool, typer.Option("--both-orders/--one-order", help="Judge each pair in both A/B orders.")
    ] = True,
    retries: Annotated[
        int, typer.Option(min=0, help="Re-asks when a judge reply has no readable verdict.")
    ] = 1,
    reward_dimension: Annotated[str, typer.Option(help="Name of what --reward-model measures.")] = "reward",
    lower_is_better: Annotated[
        bool, typer.Option("--lower-is-better", help="--reward-model is a cost model.")
    ] = False,
    tie_margin: Annotated[float, typer.Option(min=0.0, help="Reward differences up to this are ties.")] = 0.0,
    judge_unchanged: Annotated[
        bool,
        typer.Option(
            "--judge-unchanged",
            help="Also judge corrections that left the answer unchanged (default: a tie without asking).",
        ),
    ] = False,
    model: ModelOpt = None,
    template: Annotated[
        str | None, typer.Option(help="The Aligner's prompt template (default: chosen for it).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest correction, in tokens.")] = 1024,
    question_field: Annotated[str, typer.Option(help="Field holding the question.")] = "question",
    answer_field: Annotated[str, typer.Option(help="Field holding the upstream answer.")] = "answer",
    correction_field: Annotated[str, typer.Option(help="Field holding the correction.")] = "correction",
    chunk_size: Annotated[
        int, typer.Option(min=1, help="Records judged and written durably at a time.")
    ] = 16,
    bootstrap: Annotated[
        int, typer.Option(min=1, help="Bootstrap resamples for the confidence interval.")
    ] = 2000,
    confidence: Annotated[
        float, typer.Option(min=0.5, max=0.999, help="Confidence level of the interval.")
    ] = 0.95,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    plots: Annotated[
        bool, typer.Option("--plots/--no-plots", help="Write PNG plots (needs matplotlib).")
    ] = True,
    title: Annotated[str, typer.Option(help="Title of report.md.")] = "Evaluation report",
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1, mps (default: best available).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = "auto",
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue a killed run: skip records already judged.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing run in OUTPUT.")
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    server: ServerOpt = None,
    engine: EngineOpt = "transformers",
    api_key: ApiKeyOpt = None,
    timeout: TimeoutOpt = 60.0,
    max_retries: RetriesOpt = 3,
    max_concurrency: ConcurrencyOpt = 64,
) -> None:
    """Judge corrections against the original answers (3H win rates) and write a report."""
    from ..errors import AlignerError
    from ..evaluation.report import markdown_table
    from ..evaluation.runner import evaluate_file
    from ..jobs.jsonl import check_output

    if resume and overwrite:
        raise typer.BadParameter("--resume and --overwrite contradict each other: pick one")
    if (judge is None) == (reward_model is None):
        raise typer.BadParameter("pass exactly one of --judge M (an LLM judge) or --reward-model M")
    extra_rubrics: dict[str, str] | None = None
    if rubrics is not None:
        try:
            extra_rubrics = json.loads(rubrics.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise typer.BadParameter(f"--rubrics {rubrics} is not valid JSON: {exc}") from exc
        if not isinstance(extra_rubrics, dict) or not all(isinstance(v, str) for v in extra_rubrics.values()):
            raise typer.BadParameter("--rubrics must hold a JSON object of {dimension: rubric text}")

    choice = engine_choice(
        model=model,
        server=server,
        engine=engine,
        api_key=api_key,
        timeout=timeout,
        max_retries=max_retries,
        max_concurrency=max_concurrency,
    )

    def load_aligner() -> Any:  # the Aligner corrects records that have no correction yet
        return choice.load(template=template, device=device, dtype=dtype, max_new_tokens=max_new_tokens)

    try:
        check_output(output / "verdicts.jsonl", resume=resume, overwrite=overwrite)  # before any model loads
        judge_obj = _build_judge(
            judge,
            reward_model,
            dimensions=dimensions,
            rubrics=extra_rubrics,
            max_tokens=judge_max_tokens,
            concurrency=concurrency,
            both_orders=both_orders,
            retries=retries,
            reward_dimension=reward_dimension,
            lower_is_better=lower_is_better,
            tie_margin=tie_margin,
            device=device,
            dtype=dtype,
        )
        result = evaluate_file(
            input,
            output,
            judge_obj,
            aligner=load_aligner,
            question_field=question_field,
            answer_field=answer_field,
            correction_field=correction_field,
            resume=resume,
            overwrite=overwrite,
            chunk_size=chunk_size,
            show_progress=progress,
            n_resamples=bootstrap,
            confidence=confidence,
            seed=seed,
            plots=plots,
            title=title,
            judge_unchanged=judge_unchanged,
        )
    except (AlignerError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(markdown_table(result.summary))
    typer.echo(
        f"judged {result.written} records into {result.verdicts_path} ({result.failed} failed, "
        f"{result.generated} corrected now"
        + (f", {result.skipped} already done" if result.skipped else "")
        + f"); report: {output / 'report.md'}",
        err=True,
    )
    if result.failed:
        raise typer.Exit(1)


def _build_judge(
    judge: str | None,
    reward_model: str | None,
    *,
    dimensions: str,
    rubrics: dict[str, str] | None,
    max_tokens: int,
    concurrency: int,
    both_orders: bool,
    retries: int,
    reward_dimension: str,
    lower_is_better: bool,
    tie_margin: float,
    device: str | None,
    dtype: str,
) -> Any:
    if reward_model is not None:
        from ..evaluation.reward_judge import RewardModelJudge

        return RewardModelJudge.from_pretrained(
            reward_model,
            device=device,
            dtype=dtype,
            dimension=reward_dimension,
            higher_is_better=not lower_is_better,
            tie_margin=tie_margin,
        )
    from ..evaluation.chat import is_provider_spec, load_chat_model
    from ..evaluation.llm_judge import LLMJudge

    assert judge is not None
    chat = load_chat_model(judge, max_tokens=max_tokens, device=device, dtype=dtype)
    dims = [d.strip() for d in dimensions.split(",") if d.strip()]
    # A local model runs one call at a time anyway; threads only help remote APIs.
    workers = concurrency if is_provider_spec(judge) else 1
    return LLMJudge(
        chat,
        dimensions=dims,
        rubrics=rubrics,
        both_orders=both_orders,
        max_retries=retries,
        max_concurrency=workers,
        name=judge,
    )


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command to the ``aligner`` app."""
    app.command("eval", no_args_is_help=True)(eval_command)
