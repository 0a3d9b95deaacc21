"""Greedy soup: add a fine-tune to the weight average only if a held-out score improves.

Model soups (Wortsman et al., 2022, arXiv:2203.05482, Sec. 2, Algorithm 1 "GreedySoup"; the
official ``main.py`` step 4): sort the ingredients by their own held-out score, start the soup
with the best, then in one pass add each next ingredient when the uniform average of the soup
and it scores strictly higher than the soup. The score is any callable from a model folder to a
number (higher is better); :func:`mixtune.eval.ability_scorer` scores with mixtune's built-in
abilities.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mixtune.core import ConfigError, atomic_write_text
from mixtune.merge.config import MergeConfig
from mixtune.merge.run import merge


@dataclass
class SoupResult:
    """What the greedy pass did: each candidate's own score, then each step's decision."""

    ingredients: list[str]
    score: float
    candidates: dict[str, float] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)


def _soup(models: list[Path], out: Path, dtype: str | None) -> Path:
    cfg = MergeConfig(method="linear", models=[{"model": m} for m in models], out_dtype=dtype)
    return merge(cfg, out, overwrite=True)


def greedy_soup(candidates: list[str | Path], score: Callable[[Path], float], out: str | Path, *,
                dtype: str | None = None, overwrite: bool = False,
                progress: Callable[[str], None] | None = None) -> SoupResult:
    """Greedy soup of ``candidates`` (model folders of one architecture) into ``out``.

    Args:
        score: held-out score of a model folder, higher is better. Use data the final evaluation
            does not use, or the soup is chosen on the test set.
        dtype: output dtype for floating tensors (default: as the first candidate stores them).
        progress: called with a line per evaluated model.

    Returns:
        The ingredients kept, in the order added, with every score; also written to ``out/soup.json``.
    """
    paths = [Path(c) for c in candidates]
    if len(paths) < 1:
        raise ConfigError("greedy soup needs at least one candidate model")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another folder, or overwrite it")
    own = {}
    for p in paths:
        own[str(p)] = float(score(p))
        if progress:
            progress(f"{p}: {own[str(p)]:.4f}")
    order = sorted(paths, key=lambda p: -own[str(p)])  # stable: ties keep the given order
    soup, best = [order[0]], own[str(order[0])]
    result = SoupResult([str(order[0])], best, own)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".soup"))
    try:
        for p in order[1:]:
            trial = _soup([*soup, p], work / "trial", dtype)
            s = float(score(trial))
            added = s > best
            result.steps.append({"candidate": str(p), "score": s, "best_before": best, "added": added})
            if progress:
                progress(f"soup + {p}: {s:.4f} ({'added' if added else 'left out'})")
            if added:
                soup.append(p)
                best = s
        result.ingredients, result.score = [str(p) for p in soup], best
        final = _soup(soup, work / "final", dtype)
        atomic_write_text(final / "soup.json", json.dumps(asdict(result), indent=2))
        if out.exists():
            shutil.rmtree(out)
        final.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result
