"""The report stage: forgetting tables, plots and the HTML study report."""

from mixtune.report.forgetting import deltas, mean_scores
from mixtune.report.html import build_report

__all__ = ["build_report", "deltas", "mean_scores"]
