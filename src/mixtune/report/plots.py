"""Figures for the study report, returned as PNG bytes (matplotlib, no display needed)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def ability_bars(runs: list[str], abilities: list[str], means: dict[str, dict[str, float]],
                 errors: dict[str, dict[str, float]] | None = None) -> bytes:
    """Grouped bars: one group per run, one bar per ability (with seed std when given)."""
    width = 0.8 / max(len(abilities), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(runs) + 2), 3.6))
    for j, a in enumerate(abilities):
        xs = [i + (j - (len(abilities) - 1) / 2) * width for i in range(len(runs))]
        ys = [means[r].get(a, 0.0) for r in runs]
        err = [errors[r].get(a, 0.0) for r in runs] if errors else None
        ax.bar(xs, ys, width, yerr=err, label=a, color=PALETTE[j % len(PALETTE)], capsize=2)
    ax.set_xticks(range(len(runs)), runs, rotation=25, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (held-out)")
    ax.legend(ncols=len(abilities), loc="upper center", bbox_to_anchor=(0.5, 1.14), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def loss_curves(curves: dict[str, list[tuple[int, str, str, float]]], sources: list[str],
                ylabel: str = "training loss") -> bytes:
    """One panel per run: a value per source (training loss, or a mixture proportion) over the
    run's steps, stage boundaries dashed.

    ``curves[run]`` holds ``(step, stage, source, loss)`` with steps counted across the run's stages.
    """
    names = list(curves)
    cols = min(3, max(1, len(names)))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False, sharey=True)
    for ax, run in zip(axes.flat, names):
        points = curves[run]
        for j, s in enumerate(sources):
            xy = [(p[0], p[3]) for p in points if p[2] == s]
            if xy:
                ax.plot(*zip(*xy), label=s, color=PALETTE[j % len(PALETTE)], lw=1.4)
        stages = []
        for step, stage, _, _ in points:
            if not stages or stages[-1][1] != stage:
                stages.append((step, stage))
        for step, _ in stages[1:]:
            ax.axvline(step, color="#888", ls="--", lw=0.8)
        ax.set_title(run, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0][0].set_ylabel(ylabel)
    legend: dict[str, object] = {}  # every source that appears in any panel, in source order
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels = [s for s in sources if s in legend]
    fig.legend([legend[s] for s in labels], labels, ncols=len(labels), loc="upper center",
               bbox_to_anchor=(0.5, 1.03), frameon=False)
    fig.tight_layout()
    return _png(fig)


def scaling(amounts: list[float], series: dict[str, dict[float, float]]) -> bytes:
    """Score against data amount (log scale), one line per run and ability."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for j, (label, by_amount) in enumerate(series.items()):
        xs = [a for a in amounts if a in by_amount]
        ax.plot(xs, [by_amount[a] for a in xs], marker="o", label=label, color=PALETTE[j % len(PALETTE)])
    ax.set_xscale("log")
    ax.set_xlabel("share of each source used")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)
