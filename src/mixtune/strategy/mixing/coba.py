"""``coba``: batches keep the stage's natural proportions and the loss is MFTCoder's case3 with
CoBa's convergence-balanced task weights (Gong et al., 2024, arXiv:2410.06741), from every step's
validation losses (see :func:`coba_weights`)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from mixtune.core import Strict
from mixtune.strategy.mixing.base import Mixer, ProportionalRows, StageRows, register, shares, softmax


class CobaParams(Strict):
    """CoBa (Gong et al., 2024, arXiv:2410.06741, Sec. 3): convergence-balanced loss weights, natural proportions."""

    name: Literal["coba"] = "coba"
    warmup: int = Field(default=100, ge=2)
    """Steps with equal task weights before convergence balancing starts (official 100)."""
    history: int = Field(default=200, ge=2)
    """Validation-loss points the slopes are fitted on (official 200)."""
    tau: float = Field(default=5.0, gt=0)
    """Temperature of the divergence factor (official 5)."""
    validation: int = Field(default=32, ge=1)
    """Held-out examples per source for validation losses (taken out of the stage's training data)."""


def slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y on x (0 with fewer than two points); zero losses are left out, as
    CoBa's ``fit_window_slope``."""
    keep = y != 0
    x, y = x[: keep.sum()], y[keep]
    if len(y) < 2:
        return 0.0
    a = np.stack([x, np.ones_like(x)], 1).astype(float)
    return float(np.linalg.solve(a.T @ a, a.T @ y)[0])


def coba_weights(task_slopes: np.ndarray, total_slopes: np.ndarray, start: int, tau: float) -> np.ndarray:
    """CoBa's task weights (Gong et al., 2024, arXiv:2410.06741, Sec. 3; official
    ``compute_per_task_weight``) from every step's fitted slopes since warm-up.

    Args:
        task_slopes: ``(K, S)``, each task's validation-loss slope at each step since warm-up.
        total_slopes: ``(S,)``, the slope of the largest task loss at each step.
        start: first column of the slope history the absolute score looks at.

    RCS = softmax(K s / sum|s|) (s: the latest slopes); ACS = softmax of the latest column of
    -H s_hist / sum_hist |s_hist| (H columns, per task); DF = T softmax(-T tau t / sum|t|)[last]
    over the T total slopes t; w = softmax(K (DF RCS + (1 - DF) ACS)); if a weight falls below
    1/(10K), w = (1 - K/(10K)) w + 1/(10K).
    """
    k = task_slopes.shape[0]
    current = task_slopes[:, -1]
    rcs = softmax(k * current / max(np.abs(current).sum(), 1e-300))
    hist = task_slopes[:, start:]
    reverse = -hist.shape[1] * hist / np.maximum(np.abs(hist).sum(1, keepdims=True), 1e-300)
    acs = softmax(reverse[:, -1])
    t = len(total_slopes)
    df = softmax(-t * total_slopes / max(np.abs(total_slopes).sum(), 1e-300) * tau)[-1] * t
    w = softmax(k * (df * rcs + (1 - df) * acs))
    floor = 1 / (10 * k)
    if (w < floor).any():
        w = w * (1 - floor * k) + floor
    return w


class Coba(Mixer):
    """CoBa (Gong et al., 2024, arXiv:2410.06741; official ``CoBaStatus``, one update per step):
    validation losses relative to the stage's first, slopes over the recent history, task weights
    from the warm-up on. Validation losses are wanted before step 0 and after every step."""

    def __init__(self, p: CobaParams, rows: StageRows) -> None:
        self.cfg, self.draw, self.names = p, ProportionalRows(rows), rows.groups.names
        m = len(self.names)
        natural = [len(r) for r in rows.groups.rows]
        self.p = np.array(natural, dtype=float) / sum(natural)  # sampling keeps the natural proportions
        self.w = np.full(m, 1 / m)
        self.init: np.ndarray | None = None
        self.losses: list[list[float]] = []
        self.slopes: list[list[float]] = []
        self.total: list[float] = []

    def rows(self, step: int) -> list[int]:
        return self.draw.rows(self.p)

    def wants_validation(self, step: int, *, after: bool) -> bool:
        return after or step == 0

    def observe(self, step: int, losses: np.ndarray, *, after: bool) -> None:
        losses = np.asarray(losses, dtype=float)
        if not after:
            if step == 0 and self.init is None:
                self.init = np.where(losses > 0, losses, 1.0)
            return
        self.losses.append((losses / self.init).tolist())
        done = step + 1
        if done < self.cfg.warmup:
            return
        start = max(0, done - self.cfg.history)
        x = np.arange(start, done, dtype=float)
        hist = np.array(self.losses[-len(x):])  # (points, K)
        self.slopes.append([slope(x, hist[:, i]) for i in range(len(self.names))])
        self.total.append(slope(x, hist.max(1)))
        self.w = coba_weights(np.array(self.slopes).T, np.array(self.total), start, self.cfg.tau)

    def loss_weights(self) -> np.ndarray:
        return self.w

    def log(self, step: int) -> dict[str, float]:
        return shares(self.names, self.w)

    def state_dict(self) -> dict:
        return self.draw.state_dict({"coba": {"w": self.w.tolist(),
                                              "init": None if self.init is None else self.init.tolist(),
                                              "losses": self.losses, "slopes": self.slopes, "total": self.total}})

    def load_state_dict(self, state: dict) -> None:
        c = self.draw.load_state_dict(state)["coba"]
        self.w, self.losses, self.slopes, self.total = np.array(c["w"]), c["losses"], c["slopes"], c["total"]
        self.init = None if c["init"] is None else np.array(c["init"])


register("coba", CobaParams, Coba)
