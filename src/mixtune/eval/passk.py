"""pass@k: the unbiased estimator of Chen et al. 2021 from n samples per problem, c of them correct."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mixtune.core import ConfigError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem (Chen et al. 2021, "Evaluating Large Language Models Trained on
    Code", arXiv:2107.03374, Eq. 1, in the numerically stable form of their Figure 3).

    With n samples of which c pass, the chance that k samples drawn without replacement contain a
    passing one is ``1 - C(n-c, k) / C(n, k)``. As a product (no large binomials):
    ``C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)``; it is 1 when ``n - c < k`` (every
    k-subset holds a passing sample).

    Args:
        n: samples drawn for the problem (>= 1).
        c: samples that passed (0 <= c <= n).
        k: the k of pass@k (1 <= k <= n).

    Returns:
        pass@k in [0, 1].

    Raises:
        ConfigError: k > n (too few samples for this k), or counts out of range.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"pass@k: {name} = {value!r}, expected an integer")
    if n < 1:
        raise ConfigError(f"pass@k: n = {n} samples, expected at least 1")
    if not 0 <= c <= n:
        raise ConfigError(f"pass@k: c = {c} correct samples of n = {n}, expected 0 <= c <= n")
    if k < 1:
        raise ConfigError(f"pass@k: k = {k}, expected at least 1")
    if k > n:
        raise ConfigError(f"pass@{k} needs at least k = {k} samples per problem, but a problem has n = {n}; "
                          f"draw num_samples >= {k} or lower k")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(num_samples: int | Sequence[int], num_correct: Sequence[int], k: int) -> float:
    """pass@k of a benchmark: :func:`pass_at_k` per problem, averaged over problems (Chen et al. 2021,
    arXiv:2107.03374, Eq. 1, the expectation over problems).

    Args:
        num_samples: n per problem, or one n for all.
        num_correct: c per problem.
        k: the k of pass@k.

    Returns:
        The mean over problems.

    Raises:
        ConfigError: no problems, lengths differ, or a problem's counts are invalid for k (see :func:`pass_at_k`).
    """
    correct = list(num_correct)
    ns = [num_samples] * len(correct) if isinstance(num_samples, (int, np.integer)) else list(num_samples)
    if not correct:
        raise ConfigError("pass@k over no problems: num_correct is empty")
    if len(ns) != len(correct):
        raise ConfigError(f"pass@k: {len(ns)} sample counts for {len(correct)} problems; give one n per problem")
    return float(np.mean([pass_at_k(n, c, k) for n, c in zip(ns, correct)]))
