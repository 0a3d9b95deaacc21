"""Gains and forgetting from per-run ability scores."""

from __future__ import annotations

import statistics
from collections import defaultdict


def mean_scores(rows: list[dict]) -> dict[tuple[str, float], dict[str, tuple[float, float, int]]]:
    """``{(run name, amount): {ability: (mean, std, seeds)}}`` over seeds."""
    acc: dict[tuple[str, float], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        acc[(r["name"], r["amount"])][r["ability"]].append(r["value"])
    return {k: {a: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for a, v in abil.items()}
            for k, abil in acc.items()}


def deltas(scores: dict[str, dict[str, float]], higher_is_better: dict[str, bool]) -> dict[str, dict[str, dict]]:
    """Per run and ability: the change against the base and against the best specialist.

    Args:
        scores: ``{run: {ability: score}}``; the base run is named ``base`` and specialists
            ``specialist:<source>``.
        higher_is_better: per ability; a lower-is-better metric is negated so that a positive
            change is always a gain and a negative one forgetting.

    Returns:
        ``{run: {ability: {"vs_base": float | None, "vs_specialist": float | None, "specialist": str | None}}}``
        where the best specialist for an ability is the specialist run scoring best on it.
    """
    sign = {a: 1.0 if hib else -1.0 for a, hib in higher_is_better.items()}
    base = scores.get("base", {})
    specialists = {n: s for n, s in scores.items() if n.startswith("specialist:")}
    out: dict[str, dict[str, dict]] = {}
    for run, by_ability in scores.items():
        out[run] = {}
        for a, v in by_ability.items():
            sg = sign.get(a, 1.0)
            best = max(specialists, key=lambda n: sg * specialists[n].get(a, float("-inf")), default=None)
            best_v = specialists[best].get(a) if best else None
            out[run][a] = {
                "vs_base": sg * (v - base[a]) if a in base else None,
                "vs_specialist": sg * (v - best_v) if best_v is not None else None,
                "specialist": best,
            }
    return out
