"""The evaluation report: a Markdown table, ``summary.json`` and PNG plots (matplotlib)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import missing
from .metrics import EvalSummary

WIN_RATES_PNG, OUTCOMES_PNG, SIMILARITY_PNG = "win_rates.png", "outcomes.png", "similarity.png"
_COLORS = {"win": "#2e7d32", "tie": "#9e9e9e", "loss": "#c62828", "invalid": "#ffcc80"}


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1f}%" if signed else f"{value:.1f}%"


def markdown_table(summary: EvalSummary) -> str:
    """The per-dimension table: counts, win rate with its confidence interval, order consistency."""
    level = f"{round(summary.confidence * 100)}% CI"
    lines = [
        f"| dimension | wins | ties | losses | invalid | win rate | {level} | order consistency |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for m in summary.dimensions:
        ci = "n/a" if m.ci_low is None or m.ci_high is None else f"[{m.ci_low:+.1f}, {m.ci_high:+.1f}]"
        consistency = "n/a" if m.consistency is None else f"{100 * m.consistency:.0f}%"
        lines.append(
            f"| {m.dimension} | {m.wins} | {m.ties} | {m.losses} | {m.invalid} | {_pct(m.win_rate, signed=True)} "
            f"| {ci} | {consistency} |"
        )
    return "\n".join(lines)


def markdown_report(summary: EvalSummary, *, title: str = "Evaluation report", plots: bool = True) -> str:
    """The whole ``report.md``: headline numbers, the table, how to read it, the plots."""
    changed = "n/a" if summary.changed_share is None else f"{100 * summary.changed_share:.1f}%"
    similarity = "n/a" if summary.mean_similarity is None else f"{summary.mean_similarity:.3f}"
    parts = [
        f"# {title}",
        "",
        f"- judge: `{summary.judge or 'unknown'}`",
        f"- records: {summary.records} ({summary.records - summary.failed} evaluated, {summary.failed} failed)",
        f"- corrections that changed the answer: {changed}; mean similarity to the answer: {similarity}",
        "",
        markdown_table(summary),
        "",
        "Win rate = (wins - losses) / (wins + ties + losses) x 100, from the correction's side: +100 means every "
        "correction was judged better than the original answer, -100 every one worse. Invalid verdicts (no "
        "readable answer from the judge) are left out of the rate. The interval is a percentile bootstrap over "
        "records. Order consistency is the share of verdicts where the judge agreed with itself with the answers "
        "shown in both orders (low values mean position bias).",
    ]
    if plots:
        parts += [
            "",
            f"![win rates]({WIN_RATES_PNG})",
            "",
            f"![outcomes]({OUTCOMES_PNG})",
            "",
            f"![similarity]({SIMILARITY_PNG})",
        ]
    return "\n".join(parts) + "\n"


def plot_win_rates(summary: EvalSummary, path: str | os.PathLike[str]) -> Path:
    """Horizontal bars of the win rate per dimension, with the confidence interval as error bars."""
    Figure = _figure_class()
    dims = summary.dimensions
    fig = Figure(figsize=(6.4, 0.7 * len(dims) + 1.4), layout="constrained")
    ax = fig.subplots()
    y = list(range(len(dims)))[::-1]
    rates = [m.win_rate or 0.0 for m in dims]
    errors = [
        [max(0.0, r - (m.ci_low if m.ci_low is not None else r)) for r, m in zip(rates, dims)],
        [max(0.0, (m.ci_high if m.ci_high is not None else r) - r) for r, m in zip(rates, dims)],
    ]
    colors = [_COLORS["win"] if r > 0 else _COLORS["loss"] if r < 0 else _COLORS["tie"] for r in rates]
    ax.barh(y, rates, color=colors, height=0.6)
    ax.errorbar(rates, y, xerr=errors, fmt="o", color="black", capsize=4, markersize=4)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, [m.dimension for m in dims])
    ax.set_xlim(-100, 100)
    ax.set_xlabel(f"win rate of the correction over the original (%), {round(summary.confidence * 100)}% CI")
    for yi, r, m in zip(y, rates, dims):
        ax.text(
            r + (3 if r >= 0 else -3),
            yi + 0.32,
            _pct(m.win_rate, signed=True),
            va="center",
            ha="left" if r >= 0 else "right",
            fontsize=9,
        )
    ax.set_title(f"Win rate by dimension (judge: {summary.judge})", fontsize=10)
    return _save(fig, path)


def plot_outcomes(summary: EvalSummary, path: str | os.PathLike[str]) -> Path:
    """Stacked bars of wins, ties, losses and invalid verdicts per dimension."""
    Figure = _figure_class()
    dims = summary.dimensions
    fig = Figure(figsize=(6.4, 0.7 * len(dims) + 1.4), layout="constrained")
    ax = fig.subplots()
    y = list(range(len(dims)))[::-1]
    left = [0] * len(dims)
    for key, label in (("wins", "win"), ("ties", "tie"), ("losses", "loss"), ("invalid", "invalid")):
        values = [getattr(m, key) for m in dims]
        ax.barh(y, values, left=left, color=_COLORS[label], label=key, height=0.6)
        left = [a + b for a, b in zip(left, values)]
    ax.set_yticks(y, [m.dimension for m in dims])
    ax.set_xlabel("records")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False, fontsize=9)
    return _save(fig, path)


def plot_similarity(summary: EvalSummary, path: str | os.PathLike[str]) -> Path:
    """Histogram of how similar each correction is to its original (1.0 = unchanged)."""
    Figure = _figure_class()
    fig = Figure(figsize=(6.4, 2.8), layout="constrained")
    ax = fig.subplots()
    ax.hist(summary.similarities, bins=[i / 20 for i in range(21)], color="#1565c0", edgecolor="white")
    ax.set_xlim(0, 1)
    ax.set_xlabel("similarity of the correction to the original answer (difflib ratio)")
    ax.set_ylabel("records")
    ax.yaxis.set_major_locator(_integer_ticks())
    return _save(fig, path)


def write_report(
    summary: EvalSummary,
    out_dir: str | os.PathLike[str],
    *,
    title: str = "Evaluation report",
    plots: bool = True,
) -> list[Path]:
    """Write ``report.md``, ``summary.json`` and (with ``plots``) the PNG plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if plots:
        written += [
            plot_win_rates(summary, out / WIN_RATES_PNG),
            plot_outcomes(summary, out / OUTCOMES_PNG),
            plot_similarity(summary, out / SIMILARITY_PNG),
        ]
    (out / "report.md").write_text(markdown_report(summary, title=title, plots=plots), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    return [out / "report.md", out / "summary.json", *written]


def _figure_class() -> type:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise missing("matplotlib", "eval", feature="the plots of the evaluation report") from exc
    return Figure


def _integer_ticks() -> object:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _save(fig: object, path: str | os.PathLike[str]) -> Path:
    fig.savefig(path, dpi=110)  # type: ignore[attr-defined]
    return Path(path)


__all__ = [
    "markdown_report",
    "markdown_table",
    "plot_outcomes",
    "plot_similarity",
    "plot_win_rates",
    "write_report",
]
