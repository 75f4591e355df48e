"""Evaluate corrections: pairwise 3H win rates from an LLM judge or a reward model.

``import aligner_core.evaluation`` is cheap: LangChain, transformers and matplotlib load only when
a judge runs or a report is plotted. See docs/evaluation.md.
"""

from __future__ import annotations

from .judges import OUTCOMES, Comparison, Judge, Outcome, Verdict, combine_orders
from .llm_judge import LLMJudge
from .metrics import DimensionMetrics, EvalSummary, bootstrap_ci, dimension_metrics, summarize, win_rate
from .report import markdown_report, markdown_table, write_report
from .reward_judge import RewardModelJudge
from .rubrics import RUBRICS, format_prompt, parse_verdict
from .runner import VERDICTS_FILE, EvalResult, evaluate_file

__all__ = [
    "OUTCOMES",
    "RUBRICS",
    "VERDICTS_FILE",
    "Comparison",
    "DimensionMetrics",
    "EvalResult",
    "EvalSummary",
    "Judge",
    "LLMJudge",
    "Outcome",
    "RewardModelJudge",
    "Verdict",
    "bootstrap_ci",
    "combine_orders",
    "dimension_metrics",
    "evaluate_file",
    "format_prompt",
    "markdown_report",
    "markdown_table",
    "parse_verdict",
    "summarize",
    "win_rate",
    "write_report",
]
