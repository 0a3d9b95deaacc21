"""The report stage: forgetting tables, plots, the demo's verdict and the HTML study report."""

from mixtune.report.forgetting import deltas, mean_scores
from mixtune.report.html import build_report
from mixtune.report.verdict import binomial_se, dmt_verdict

__all__ = ["binomial_se", "build_report", "deltas", "dmt_verdict", "mean_scores"]
