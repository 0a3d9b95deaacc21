"""The report stage: forgetting tables, plots, paired tests, the demo's verdict and the HTML study report."""

from mixtune.report.forgetting import deltas, mean_scores
from mixtune.report.html import build_report
from mixtune.report.paired import binomial_se, mcnemar, mcnemar_p, paired_bootstrap, paired_test, standard_error
from mixtune.report.verdict import dmt_verdict

__all__ = ["binomial_se", "build_report", "deltas", "dmt_verdict", "mcnemar", "mcnemar_p", "mean_scores",
           "paired_bootstrap", "paired_test", "standard_error"]
