"""Statistics on per-problem scores: the standard error of a score, and paired tests between two
models scored on the same problems (McNemar's exact test, the paired bootstrap).

Two models answering the same problems are compared far more sharply by pairing: only the
problems where they disagree carry information about which is better, where an unpaired
comparison of two binomials also pays for the variance the two share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np


def is_binary(scores: Sequence[float]) -> bool:
    """Every score is 0 or 1 (an accuracy, pass@1), so binomial formulas and McNemar's test apply."""
    return all(s in (0, 1) for s in scores)


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` problems: sqrt(p(1-p)/n) (0 for n = 0)."""
    return math.sqrt(p * (1 - p) / n) if n > 0 else 0.0


def standard_error(scores: Sequence[float]) -> float:
    """Standard error of the mean of per-problem ``scores``.

    For 0/1 scores (accuracy) the binomial standard error sqrt(p(1-p)/n), p the mean on n problems
    (the error bar of a benchmark score as Miller (2024), "Adding Error Bars to Evals",
    arXiv:2411.00640, recommends, with the plug-in variance p(1-p)). For other scores the sample standard error
    s/sqrt(n), s^2 = sum (x_i - mean)^2 / (n - 1); NaN for a single non-binary score (no spread to
    estimate from). 0 problems: NaN.

    Args:
        scores: one score per problem, shape (n,).
    """
    n = len(scores)
    if n == 0:
        return math.nan
    mean = sum(scores) / n
    if is_binary(scores):
        return binomial_se(mean, n)
    if n < 2:
        return math.nan
    return math.sqrt(sum((x - mean) ** 2 for x in scores) / (n - 1) / n)


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test on two models' 0/1 scores on the same problems."""

    b: int
    """Problems the first model gets right and the second wrong."""
    c: int
    """Problems the second model gets right and the first wrong."""
    p: float
    """Two-sided exact p-value."""


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c``.

    McNemar (1947), "Note on the sampling error of the difference between correlated proportions or
    percentages", Psychometrika 12(2): under the null hypothesis that both models are equally good,
    each of the n = b + c discordant problems is won by either with probability 1/2, so
    min(b, c) ~ Binomial(n, 1/2) and the exact two-sided p-value is
    p = min(1, 2 * sum_{i=0}^{min(b,c)} C(n, i) / 2^n), and p = 1 when n = 0 (the "exact"
    McNemar test, a binomial sign test on the discordant pairs; Fagerland et al. 2013, BMC Med. Res.
    Methodol. 13:91). Computed in exact integer arithmetic.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0; got b = {b}, c = {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def mcnemar(first: Sequence[float], second: Sequence[float]) -> McNemar:
    """McNemar's exact test (:func:`mcnemar_p`) on two models' 0/1 scores, problem by problem.

    Args:
        first, second: per-problem 0/1 scores of the two models on the same problems, shape (n,).

    Raises:
        ValueError: the lengths differ or a score is not 0 or 1.
    """
    _check_pairs(first, second)
    if not (is_binary(first) and is_binary(second)):
        raise ValueError("McNemar's test needs 0/1 scores; use paired_bootstrap for other scores")
    b = sum(1 for x, y in zip(first, second) if x == 1 and y == 0)
    c = sum(1 for x, y in zip(first, second) if x == 0 and y == 1)
    return McNemar(b, c, mcnemar_p(b, c))


@dataclass(frozen=True)
class PairedBootstrap:
    """The paired bootstrap of the mean difference first - second."""

    diff: float
    """Mean difference over the problems, first - second."""
    low: float
    """Lower end of the percentile confidence interval of the mean difference."""
    high: float
    """Upper end of that interval."""
    p: float
    """Two-sided p-value of "no difference"."""
    resamples: int


def paired_bootstrap(first: Sequence[float], second: Sequence[float], *, resamples: int = 10_000, seed: int = 0,
                     confidence: float = 0.95) -> PairedBootstrap:
    """Paired bootstrap of the mean difference between two models scored on the same problems.

    Efron & Tibshirani (1993), "An Introduction to the Bootstrap", Ch. 13 (percentile interval) and
    Ch. 16 (bootstrap hypothesis tests); its use for comparing two systems on one test set: Koehn
    (2004), "Statistical Significance Tests for Machine Translation Evaluation", EMNLP, Sec. 4;
    Berg-Kirkpatrick et al. (2012), "An Empirical Investigation of Statistical Significance in NLP", EMNLP.

    With d_i = first_i - second_i and mean d, draw ``resamples`` samples of n problems with
    replacement (the same problems for both models: paired), each giving a mean d*_b. Then

    - the confidence interval is the percentile interval: the (1-confidence)/2 and (1+confidence)/2
      quantiles of the d*_b;
    - the two-sided p-value tests d against the null distribution centred on 0 (the resampled means
      shifted by -d, Efron & Tibshirani Ch. 16): p = (1 + #{b : |d*_b - d| >= |d|}) / (B + 1), the
      +1 counting the observed sample itself, so that p is never 0 (Davison & Hinkley 1997,
      "Bootstrap Methods and their Application", Ch. 4).

    Args:
        first, second: per-problem scores of the two models on the same problems, shape (n,).
        resamples: B, the number of bootstrap samples.
        seed: seeds the resampling (the same inputs and seed give the same result).
        confidence: coverage of the interval.

    Raises:
        ValueError: the lengths differ or are 0, or ``resamples`` < 1.
    """
    _check_pairs(first, second)
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1; got {resamples}, {confidence}")
    d = np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)  # (n,)
    n, observed = len(d), float(d.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 4_000_000 // n)  # bounded memory: chunk x n indices at a time
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        means[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)  # (chunk,)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    # a tolerance so that resampled means equal to |d| in exact arithmetic count as ">="
    extreme = int(np.sum(np.abs(means - observed) >= abs(observed) - 1e-12))
    return PairedBootstrap(observed, float(low), float(high), (1 + extreme) / (resamples + 1), resamples)


def paired_test(first: Sequence[float], second: Sequence[float], *, resamples: int = 10_000,
                seed: int = 0) -> tuple[str, float]:
    """``("McNemar", p)`` for 0/1 scores, else ``("paired bootstrap", p)``: the test the report and
    the verdict use for two models on the same problems."""
    if is_binary(first) and is_binary(second):
        return "McNemar", mcnemar(first, second).p
    return "paired bootstrap", paired_bootstrap(first, second, resamples=resamples, seed=seed).p


def format_p(p: float) -> str:
    """A p-value to three significant digits: ``0.0625``, ``0.289``, ``1``, ``3.05e-05``."""
    return f"{p:.3g}"


def _check_pairs(first: Sequence[float], second: Sequence[float]) -> None:
    if len(first) != len(second) or not len(first):
        raise ValueError(f"a paired test needs the same problems for both models; got {len(first)} and "
                         f"{len(second)} scores")
