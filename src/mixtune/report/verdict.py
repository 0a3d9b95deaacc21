"""The demo's verdict: whether the DMT paper's effects (Dong et al., 2024) appeared, from the measured
accuracies, each comparison against two binomial standard errors of the difference."""

from __future__ import annotations

import math
import re
from fractions import Fraction

QUICK = "--quick: stages too short for a verdict; run `mixtune demo` for the real comparison"
"""What a ``--quick`` demo says instead of a verdict (its stages are too short to show the effects)."""

DMT_RUN = re.compile(r"dmt\(k=([0-9.e+-]+)\)")
RUNS = ("multi_task", "sequential", "mixed_sequential", "dmt(k=0.125)")
"""The runs the verdict compares (the demo's; a study without them gets no verdict)."""


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` problems: sqrt(p(1-p)/n)."""
    return math.sqrt(p * (1 - p) / n) if n > 0 else 0.0


def compare(a: float, b: float, problems: int) -> tuple[int, str]:
    """+1 if ``a`` exceeds ``b`` by more than two standard errors of the difference,
    sqrt((a(1-a) + b(1-b)) / problems), -1 if ``b`` exceeds ``a`` so, else 0; and the numbers."""
    se = math.sqrt((a * (1 - a) + b * (1 - b)) / problems)
    sign = 1 if a - b > 2 * se else -1 if b - a > 2 * se else 0
    return sign, f"({a:.2f} vs {b:.2f}, 2 SE = {2 * se:.2f})"


def _verdict(higher: float, lower: float, problems: int) -> str:
    sign, numbers = compare(higher, lower, problems)
    return {1: "yes", -1: "NO, the opposite", 0: "not distinguishable from noise"}[sign] + " " + numbers


def _label(run: str) -> str:
    """``dmt(k=0.125)`` -> ``DMT k=1/8``; ``multi_task`` -> ``multi-task``."""
    if m := DMT_RUN.fullmatch(run):
        return f"DMT k={Fraction(m[1]).limit_denominator(1024)}"
    return run.replace("_", "-")


def dmt_verdict(scores: dict[str, dict[str, float]], n: int, *, quick: bool = False) -> list[str]:
    """The demo's verdict, one line per claim; empty when a compared run is missing.

    Args:
        scores: ``{run name: {ability: accuracy}}`` (one seed, full amount) with ``math``, ``code``
            and ``general``.
        n: held-out problems per ability. Math and code are pooled (2n problems per run).
        quick: a ``--quick`` run: the accuracy line, then :data:`QUICK` instead of the claims.
    """
    if not all(r in scores for r in RUNS):
        return []
    avg = lambda run: (scores[run]["math"] + scores[run]["code"]) / 2  # noqa: E731
    shown = [r for r in ("multi_task", "sequential", "mixed_sequential") if r in scores]
    shown += sorted((r for r in scores if DMT_RUN.fullmatch(r)), key=lambda r: float(DMT_RUN.fullmatch(r)[1]))
    lines = ["specialist accuracy (math, code mean): " + ", ".join(f"{_label(r)} {avg(r):.2f}" for r in shown)]
    if quick:
        return [*lines, QUICK]
    lines.append(f"sequential forgets what multi-task keeps: {_verdict(avg('multi_task'), avg('sequential'), 2 * n)}")
    lines.append("DMT (k=1/8) recovers part of what mixed-sequential loses: "
                 f"{_verdict(avg('dmt(k=0.125)'), avg('mixed_sequential'), 2 * n)}")
    # kept unless mixed-sequential's general accuracy is significantly higher than DMT's
    lost, numbers = compare(scores["mixed_sequential"]["general"], scores["dmt(k=0.125)"]["general"], n)
    lines.append(f"while keeping general ability: {'NO' if lost == 1 else 'yes'} {numbers}")
    return lines
