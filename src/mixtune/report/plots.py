"""Figures for the study report, returned as PNG bytes (matplotlib, no display needed)."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", ":", "-."]


def colors(names: list[str]) -> dict[str, str]:
    """One colour per name, by first position in ``names`` (abilities in the study's order, then the
    other sources): every chart of a report takes its colours from this one mapping, so an ability
    (and the source of the same name) has the same colour in every chart, whichever it shows."""
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(dict.fromkeys(names))}


def img(png: bytes, alt: str) -> str:
    """An HTML ``<img>`` showing ``png`` (a figure of this module) embedded as a data URI, so a report is one file."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def ability_bars(runs: list[str], abilities: list[str], means: dict[str, dict[str, float]],
                 errors: dict[str, dict[str, float]] | None = None, *, palette: dict[str, str]) -> bytes:
    """Grouped bars: one group per run, one bar per ability, coloured by ``palette`` (see
    :func:`colors`), with error bars when ``errors`` is given."""
    width = 0.8 / max(len(abilities), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(runs) + 2), 3.6))
    for j, a in enumerate(abilities):
        xs = [i + (j - (len(abilities) - 1) / 2) * width for i in range(len(runs))]
        ys = [means[r].get(a, 0.0) for r in runs]
        err = [errors[r].get(a, 0.0) for r in runs] if errors else None
        ax.bar(xs, ys, width, yerr=err, label=a, color=palette[a], capsize=2)
    ax.set_xticks(range(len(runs)), runs, rotation=25, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (held-out)")
    ax.legend(ncols=len(abilities), loc="upper center", bbox_to_anchor=(0.5, 1.14), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def loss_curves(curves: dict[str, list[tuple[int, str, str, float]]], sources: list[str],
                ylabel: str = "training loss", *, palette: dict[str, str]) -> bytes:
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
        for s in sources:
            xy = [(p[0], p[3]) for p in points if p[2] == s]
            if xy:
                ax.plot(*zip(*xy), label=s, color=palette[s], lw=1.4)
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


def scaling(amounts: list[float], series: dict[tuple[str, str], dict[float, float]], *,
            palette: dict[str, str]) -> bytes:
    """Score against data amount (log scale), one line per ``(run, ability)``: the ability's colour,
    one marker and line style per run."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    runs = list(dict.fromkeys(run for run, _ in series))
    for (run, ability), by_amount in series.items():
        xs = [a for a in amounts if a in by_amount]
        i = runs.index(run)
        ax.plot(xs, [by_amount[a] for a in xs], marker=MARKERS[i % len(MARKERS)],
                ls=LINESTYLES[i // len(MARKERS) % len(LINESTYLES)], label=f"{run} · {ability}", color=palette[ability])
    ax.set_xscale("log")
    ax.set_xlabel("share of each source used")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def heatmap(labels: list[str], matrix: list[list[float]], *, title: str, vmin: float = -1.0, vmax: float = 1.0,
            cmap: str = "RdBu_r") -> bytes:
    """A square matrix over ``labels`` (e.g. task-vector cosines of runs), each cell annotated."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n, 0.6 + 0.6 * n))
    im = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(n), labels, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    for i in range(n):
        for j in range(n):
            v = matrix[i][j]
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(v - (vmin + vmax) / 2) > 0.6 * (vmax - vmin) / 2 else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def lines(series: dict[str, list[tuple[float, float]]], *, xlabel: str, ylabel: str, logx: bool = False) -> bytes:
    """One line per name of ``series`` (``(x, y)`` points), e.g. intruder counts against eps per run."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for i, (name, points) in enumerate(series.items()):
        if points:
            ax.plot(*zip(*points), marker=MARKERS[i % len(MARKERS)], ls=LINESTYLES[i // len(MARKERS) % len(LINESTYLES)],
                    color=PALETTE[i % len(PALETTE)], label=name, lw=1.4)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)
