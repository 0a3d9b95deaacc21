"""The demo's verdict: whether the DMT paper's effects (Dong et al., 2024) appeared, from the measured
accuracies, each comparison against two binomial standard errors of the difference; where both runs'
per-problem scores are known, with the p-value of a paired test on the same problems
(:func:`mixtune.report.paired.paired_test`: McNemar's exact test for 0/1 scores)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction

from mixtune.report.paired import format_p, paired_test

QUICK = "--quick: stages too short for a verdict; run `mixtune demo` for the real comparison"
"""What a ``--quick`` demo says instead of a verdict (its stages are too short to show the effects)."""

DMT_RUN = re.compile(r"dmt\(k=([0-9.e+-]+)\)")
RUNS = ("multi_task", "sequential", "mixed_sequential", "dmt(k=0.125)")
"""The runs the verdict compares (the demo's; a study without them gets no verdict)."""
MERGES = {"ties": "TIES", "lines": "LiNeS"}
"""Merged-specialist runs the verdict also compares, when present (the demo's ``merges:`` names)."""


def compare(a: float, b: float, problems: int) -> tuple[int, str]:
    """+1 if ``a`` exceeds ``b`` by more than two standard errors of the difference,
    sqrt((a(1-a) + b(1-b)) / problems), -1 if ``b`` exceeds ``a`` so, else 0; and the numbers."""
    se = math.sqrt((a * (1 - a) + b * (1 - b)) / problems)
    sign = 1 if a - b > 2 * se else -1 if b - a > 2 * se else 0
    return sign, f"({a:.2f} vs {b:.2f}, 2 SE = {2 * se:.2f})"


def _verdict(higher: float, lower: float, problems: int) -> str:
    sign, numbers = compare(higher, lower, problems)
    return {1: "yes", -1: "NO, the opposite", 0: "not distinguishable from noise"}[sign] + " " + numbers


def _paired(items: Mapping[str, Mapping[str, Sequence[float]]] | None, first: str, second: str,
            abilities: tuple[str, ...]) -> str:
    """`` (McNemar p = 0.003)``: the paired test of ``first`` against ``second`` on their per-problem
    scores of ``abilities`` pooled, or "" when either run lacks them or they are not the same problems."""
    if not items or first not in items or second not in items:
        return ""
    if not all(a in items[first] and a in items[second] and len(items[first][a]) == len(items[second][a])
               for a in abilities):
        return ""
    x = [s for a in abilities for s in items[first][a]]
    y = [s for a in abilities for s in items[second][a]]
    if not x:
        return ""
    test, p = paired_test(x, y)
    return f" ({test} p = {format_p(p)})"


def _label(run: str) -> str:
    """``dmt(k=0.125)`` -> ``DMT k=1/8``; ``multi_task`` -> ``multi-task``; ``ties`` -> ``TIES merge``."""
    if m := DMT_RUN.fullmatch(run):
        return f"DMT k={Fraction(m[1]).limit_denominator(1024)}"
    if run in MERGES:
        return f"{MERGES[run]} merge"
    return run.replace("_", "-")


def dmt_verdict(scores: dict[str, dict[str, float]], n: int, *, quick: bool = False,
                items: Mapping[str, Mapping[str, Sequence[float]]] | None = None) -> list[str]:
    """The demo's verdict, one line per claim; empty when a compared run is missing.

    Args:
        scores: ``{run name: {ability: accuracy}}`` (one seed, full amount) with ``math``, ``code``
            and ``general``; merged runs named in :data:`MERGES` add two claims each (more kept
            than sequential training? than DMT k=1/8?).
        n: held-out problems per ability. Math and code are pooled (2n problems per run).
        quick: a ``--quick`` run: the accuracy line, then :data:`QUICK` instead of the claims.
        items: ``{run name: {ability: per-problem scores}}``, the same problems in the same order for
            every run (:meth:`mixtune.study.Study.item_scores`). Where both compared runs have them,
            a claim's line ends with the paired test's p-value, `` (McNemar p = 0.003)``.
    """
    if not all(r in scores for r in RUNS):
        return []
    avg = lambda run: (scores[run]["math"] + scores[run]["code"]) / 2  # noqa: E731
    shown = [r for r in ("multi_task", "sequential", "mixed_sequential") if r in scores]
    shown += sorted((r for r in scores if DMT_RUN.fullmatch(r)), key=lambda r: float(DMT_RUN.fullmatch(r)[1]))
    merged = [r for r in MERGES if r in scores]
    shown += merged
    lines = ["specialist accuracy (math, code mean): " + ", ".join(f"{_label(r)} {avg(r):.2f}" for r in shown)]
    if quick:
        return [*lines, QUICK]
    pooled = ("math", "code")
    lines.append(f"sequential forgets what multi-task keeps: {_verdict(avg('multi_task'), avg('sequential'), 2 * n)}"
                 + _paired(items, "multi_task", "sequential", pooled))
    lines.append("DMT (k=1/8) recovers part of what mixed-sequential loses: "
                 f"{_verdict(avg('dmt(k=0.125)'), avg('mixed_sequential'), 2 * n)}"
                 + _paired(items, "dmt(k=0.125)", "mixed_sequential", pooled))
    # kept unless mixed-sequential's general accuracy is significantly higher than DMT's
    lost, numbers = compare(scores["mixed_sequential"]["general"], scores["dmt(k=0.125)"]["general"], n)
    lines.append(f"while keeping general ability: {'NO' if lost == 1 else 'yes'} {numbers}"
                 + _paired(items, "mixed_sequential", "dmt(k=0.125)", ("general",)))
    for run in merged:  # the other road: specialists trained apart, merged in weight space
        lines.append(f"merging the specialists ({MERGES[run]}) keeps more of them than sequential training: "
                     f"{_verdict(avg(run), avg('sequential'), 2 * n)}" + _paired(items, run, "sequential", pooled))
        lines.append(f"  ... than DMT (k=1/8): {_verdict(avg(run), avg('dmt(k=0.125)'), 2 * n)}"
                     + _paired(items, run, "dmt(k=0.125)", pooled))
    return lines
