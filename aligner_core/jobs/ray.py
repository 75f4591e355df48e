"""Spread corrections over a Ray cluster: Ray Data for the rows, one Aligner per actor for the model.

Ray is an orchestrator, not an engine: each replica runs an ordinary ``Aligner`` (transformers, vLLM or
an OpenAI-compatible server, as ``EngineChoice`` says), so a Ray run gives the same corrections as a
local one. ``correct_dataset`` is the building block for Ray Data pipelines; ``correct_file_ray`` is
``aligner correct --ray``: the same durable, resumable JSONL output as ``aligner_core.jobs.files``.

Extra ``[ray]``; ``ray`` is imported only when one of these functions runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..context import CONTEXT_KEYS
from ..engines.base import GenerationParams
from ..errors import AlignerError, EngineUnavailableError, InvalidInputError, missing
from ..history import HISTORY_KEYS
from .files import JobStats, error_info, output_line
from .jsonl import open_resumable, write_durably
from .records import count_items, numbered

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from .choice import EngineChoice

STATS_COLUMN = "aligner"
ERROR_COLUMN = "aligner_error"
_LINE = "_aligner_line"  # private columns of the file job
_OUTAGE = "_aligner_outage"


def correct_dataset(
    ds: ray.data.Dataset,
    choice: EngineChoice,
    *,
    load_options: dict[str, Any] | None = None,
    replicas: int = 1,
    question_field: str = "question",
    answer_field: str = "answer",
    output_field: str = "correction",
    batch_size: int = 64,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    **generation: Any,
) -> ray.data.Dataset:
    """Add ``output_field`` (the corrected text), ``aligner`` and ``aligner_error`` columns to ``ds``.

    ``replicas`` actors each load one Aligner with ``choice.load(**load_options)`` and correct
    ``batch_size`` rows at a time; ``generation`` options go to ``Aligner.correct_batch``. Other columns
    are passed through untouched. ``aligner`` (the ``Correction.stats()`` object) and ``aligner_error``
    (``{"type", "message"}``) are JSON strings, null when not applicable: nested objects with free-form
    metadata do not round-trip through Arrow schemas, strings do. A bad row (not a string, empty answer,
    too long) gets a null correction and its error, and so does a row the engine could not serve (a
    server down: ``aligner_error.type`` says so); a missing column fails the job.

    Each replica asks for ``num_cpus`` (default 1) and ``num_gpus`` (default 1 when the choice runs on a
    GPU: ``device="cuda..."``, ``engine="vllm"``, or no device on a cluster with GPUs; else 0). Rows come
    back in input order when ``DataContext.get_current().execution_options.preserve_order`` is set.
    """
    return _map(
        ds,
        choice,
        load_options,
        replicas,
        question_field,
        answer_field,
        output_field,
        batch_size,
        num_cpus,
        num_gpus,
        generation,
        flag_outages=False,
    )


def correct_file_ray(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    choice: EngineChoice,
    *,
    load_options: dict[str, Any] | None = None,
    replicas: int = 1,
    address: str | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    output_field: str = "correction",
    resume: bool = False,
    overwrite: bool = False,
    chunk_size: int = 64,
    show_progress: bool = True,
    **generation: Any,
) -> JobStats:
    """``correct_jsonl`` over a Ray cluster: the same output lines, in input order, written durably.

    ``address=None`` joins the cluster named by ``$RAY_ADDRESS`` if set, else starts a local one
    (shut down at the end); ``"auto"`` or ``"ray://host:10001"`` joins a running cluster (left running).
    A Ray runtime this process already initialised is used as it is. The workers must be able to import
    ``aligner_core`` and read the model (a local runtime shares this environment).
    Records are read on the driver from the resume point; malformed lines and rows without string
    fields never leave it and get their ``aligner_error`` in place. Each ``chunk_size`` batch is written
    and fsynced as soon as it and all before it are done, so a killed run loses and repeats nothing
    on ``resume``. When the engine is unavailable (a server down), the rows before it are written and
    ``EngineUnavailableError`` is raised, so ``resume`` retries the rest.
    """
    from tqdm.auto import tqdm

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    if replicas < 1:
        raise ValueError(f"replicas must be a positive integer, got {replicas}")
    ray = _import_ray()
    f, done = open_resumable(out_path, resume=resume, overwrite=overwrite)
    stats = JobStats(skipped=done)
    rows = [
        {
            _LINE: n,
            question_field: r[question_field],
            answer_field: r[answer_field],
            "history": _as_json(r, HISTORY_KEYS),
            "context": _as_json(r, CONTEXT_KEYS),
        }
        for n, r in numbered(in_path, skip=done)
        if _sendable(r, question_field, answer_field)
    ]
    source = numbered(in_path, skip=done)  # read again in step with the results: records stay on disk
    with (
        f,
        tqdm(
            total=count_items(in_path), initial=done, desc="Correcting", unit="rec", disable=not show_progress
        ) as bar,
    ):
        if rows:
            connected = _connect(ray, address, replicas)
            try:
                with _ordered_and_quiet(ray):
                    ds = _map(
                        ray.data.from_items(rows),
                        choice,
                        load_options,
                        replicas,
                        question_field,
                        answer_field,
                        output_field,
                        chunk_size,
                        None,
                        None,
                        generation,
                        flag_outages=True,
                    )
                    try:
                        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                            _write_batch(
                                f,
                                stats,
                                bar,
                                source,
                                batch.to_pylist(),
                                question_field,
                                answer_field,
                                output_field,
                            )
                    except ray.exceptions.RayError as exc:
                        raise _original_error(exc) from exc
            finally:
                if connected:
                    ray.shutdown()
        _write_batch(
            f, stats, bar, source, [], question_field, answer_field, output_field
        )  # trailing bad lines
    stats.read = stats.skipped + stats.written  # every record read was matched to its line above
    return stats


class _AlignerReplica:
    """One Ray actor: loads its Aligner once, then corrects the batches Ray Data hands it."""

    def __init__(
        self,
        choice: EngineChoice,
        load_options: dict[str, Any],
        fields: tuple[str, str, str],
        cpu_threads: int | None,
        flag_outages: bool,
        generation: dict[str, Any],
    ) -> None:
        if cpu_threads is not None:
            # Torch uses every core by default; replicas sharing a node then fight over them (measured
            # 31-53 s a batch with 2 threads under load against 4.6 s with 1 on a 2-core machine).
            import torch

            torch.set_num_threads(cpu_threads)
        self.aligner = choice.load(**load_options)
        self.fields = fields
        self.flag_outages = flag_outages
        self.generation = generation

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        qf, af, of = self.fields
        absent = [c for c in (qf, af) if c not in batch.column_names]
        if absent:
            raise InvalidInputError(
                f"the dataset has no column(s) {absent}; its columns are {batch.column_names}: "
                "pass question_field= and answer_field="
            )
        pairs: list[Any] = [
            {"question": q, "answer": a}
            for q, a in zip(batch.column(qf).to_pylist(), batch.column(af).to_pylist())
        ]
        # a conversation's earlier turns and the answer's grounding (list columns, or JSON text from a file job)
        for key in (*HISTORY_KEYS, *CONTEXT_KEYS):
            if key in batch.column_names:
                for pair, value in zip(pairs, batch.column(key).to_pylist()):
                    pair[key] = value  # JSON text is read per pair
        results = self.aligner.correct_batch(pairs, return_exceptions=True, **self.generation)
        failed = [r if isinstance(r, Exception) else None for r in results]
        columns: dict[str, list[Any]] = {
            of: [None if e else r.text for r, e in zip(results, failed)],  # type: ignore[union-attr]
            STATS_COLUMN: [None if e else json.dumps(r.stats()) for r, e in zip(results, failed)],  # type: ignore[union-attr]
            ERROR_COLUMN: [json.dumps(error_info(e)) if e else None for e in failed],
        }
        if self.flag_outages:
            columns[_OUTAGE] = [isinstance(e, EngineUnavailableError) for e in failed]
        table = batch.drop_columns([c for c in columns if c in batch.column_names])
        for name, values in columns.items():
            table = table.append_column(
                name, pa.array(values, pa.bool_() if name == _OUTAGE else pa.string())
            )
        return table


def _map(
    ds: ray.data.Dataset,
    choice: EngineChoice,
    load_options: dict[str, Any] | None,
    replicas: int,
    qf: str,
    af: str,
    of: str,
    batch_size: int,
    num_cpus: float | None,
    num_gpus: float | None,
    generation: dict[str, Any],
    *,
    flag_outages: bool,
) -> ray.data.Dataset:
    if replicas < 1:
        raise ValueError(f"replicas must be a positive integer, got {replicas}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    GenerationParams().updated({k: v for k, v in generation.items() if k != "on_overflow"})  # fail before Ray
    options = dict(load_options or {})
    cpus = 1.0 if num_cpus is None else num_cpus
    gpus = (1.0 if _uses_gpu(choice, options) else 0.0) if num_gpus is None else num_gpus
    local_cpu = not choice.server and not gpus
    import ray.data

    return ds.map_batches(
        _AlignerReplica,
        fn_constructor_kwargs={
            "choice": choice,
            "load_options": options,
            "fields": (qf, af, of),
            "cpu_threads": max(1, int(cpus)) if local_cpu else None,
            "flag_outages": flag_outages,
            "generation": generation,
        },
        compute=ray.data.ActorPoolStrategy(size=replicas),  # replaces concurrency= (deprecated in 2.51)
        batch_size=batch_size,
        batch_format="pyarrow",
        zero_copy_batch=True,
        num_cpus=cpus,
        num_gpus=gpus,
    )


def _uses_gpu(choice: EngineChoice, load_options: dict[str, Any]) -> bool:
    """Whether a replica needs a GPU: vLLM, an explicit CUDA device, or no device on a cluster with GPUs
    (``device=None`` means the best device locally; Ray hides GPUs from actors that did not ask for one)."""
    if choice.server:
        return False
    if choice.engine == "vllm":
        return True
    device = load_options.get("device")
    if device is not None:
        return str(device).startswith("cuda")
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def _connect(ray: Any, address: str | None, replicas: int) -> bool:
    """Join or start a Ray runtime; True when this call connected (so the caller disconnects again:
    ``ray.shutdown()`` stops a runtime this process started, and only leaves a cluster it joined)."""
    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        ray.init(address=address, **quiet)
    else:  # "local" starts a runtime of our own, never joining a cluster this machine happens to run
        ray.init(address="local", num_cpus=max(2, replicas), include_dashboard=False, **quiet)
    return True


@contextmanager
def _ordered_and_quiet(ray: Any) -> Iterator[None]:
    """Ray Data settings of a file job, restored afterwards: results in input order (what lets them be
    written as they arrive), and no progress bars or INFO lines of its own beside ours; warnings stay."""
    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    loggers = {
        logging.getLogger("ray.data"): logging.WARNING,
        logging.getLogger("ray.data._internal.progress"): logging.ERROR,
    }  # "progress bars disabled"
    levels = {lg: lg.level for lg in loggers}
    context.execution_options.preserve_order, context.enable_progress_bars = True, False
    for lg, level in loggers.items():
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        for lg, level in levels.items():
            lg.setLevel(level)


def _original_error(exc: BaseException) -> BaseException:
    """The llm-aligner error behind a Ray failure (a replica that failed to load, a bad option), so the
    CLI reports it as usual: Ray hands it back wrapped, with only its text, so it is rebuilt from that."""
    from .. import errors

    found = re.findall(r"aligner_core\.errors\.(\w+): (.*)", str(exc))
    cls = getattr(errors, found[-1][0], None) if found else None
    if isinstance(cls, type) and issubclass(cls, AlignerError):
        return cls(found[-1][1])
    return exc


def _sendable(record: dict[str, Any] | Exception, qf: str, af: str) -> bool:
    return isinstance(record, dict) and isinstance(record.get(qf), str) and isinstance(record.get(af), str)


Records = Iterator[tuple[int, dict[str, Any] | Exception]]


def _write_batch(
    f: Any,
    stats: JobStats,
    bar: Any,
    source: Records,
    results: list[dict[str, Any]],
    qf: str,
    af: str,
    of: str,
) -> None:
    """Write the input records up to the last of ``results`` (all that are left when it is empty),
    pairing each record sent to Ray with its result and failing the others in place."""
    lines: list[dict[str, Any]] = []
    pending = iter(results)
    outage: dict[str, Any] | None = None
    for number, record in _until_matched(source, len(results), qf, af) if results else source:
        error: dict[str, Any] | None = None
        if isinstance(record, Exception):
            error, record = error_info(record), {"line": number}
        elif not _sendable(record, qf, af):
            error = error_info(_bad_fields(number, record, qf, af))
        else:
            result = next(pending, None)
            if result is None or result[_LINE] != number:  # preserve_order is what makes this hold
                raise AlignerError(
                    f"Ray returned {result and result[_LINE]} where line {number} was expected"
                )
            if result[_OUTAGE]:
                outage = json.loads(result[ERROR_COLUMN])
                break
            if result[ERROR_COLUMN] is None:
                line_stats = json.loads(result[STATS_COLUMN])
                stats.changed += int(line_stats["changed"])
                lines.append(output_line(record, of, text=result[of], stats=line_stats))
                continue
            error = json.loads(result[ERROR_COLUMN])
        stats.failed += 1
        stats.failed_at.append(f"record {number}")
        lines.append(output_line(record, of, error=error))
    write_durably(f, lines)
    stats.written += len(lines)
    bar.update(len(lines))
    if outage is not None:
        raise EngineUnavailableError(f"{outage['type']}: {outage['message']}")


def _as_json(record: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    """A record's history (or context) as JSON text, so rows with and without it share one Arrow column type."""
    value = next((record[k] for k in keys if record.get(k) not in (None, "")), None)
    return value if value is None or isinstance(value, str) else json.dumps(value)


def _until_matched(source: Records, count: int, qf: str, af: str) -> Records:
    """Records from ``source`` up to and including the ``count``-th one that was sent to Ray."""
    sent = 0
    while sent < count:
        number, record = next(source)
        sent += _sendable(record, qf, af)
        yield number, record


def _bad_fields(number: int, record: dict[str, Any], qf: str, af: str) -> InvalidInputError:
    absent = [k for k in (qf, af) if k not in record]
    if absent:
        return InvalidInputError(f"line {number}: missing field(s) {absent}")
    wrong = next(k for k in (qf, af) if not isinstance(record[k], str))
    return InvalidInputError(f"line {number}: {wrong} must be a str, got {type(record[wrong]).__name__}")


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise missing("ray", "ray", "Ray jobs (--ray)") from exc
    return ray


__all__ = ["correct_dataset", "correct_file_ray"]
