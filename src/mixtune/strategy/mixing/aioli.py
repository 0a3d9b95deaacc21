"""``aioli``: proportions learned online (Chen et al., 2025, arXiv:2411.05735, Algorithms 1-2;
official ``aioli_trainer.py``).

- training is cut into rounds of ``round_steps`` optimizer steps;
- a round starts with LearnParams: R = ``probe_rounds`` random orders of the m groups; for each
  group j in turn, ``probe_steps`` real training steps on the smoothed one-hot mixture
  w_j = (f at j, (1 - f)/(m - 1) elsewhere), then the validation loss of every group; the drop in
  loss of group i is added to A^[i, j];
- A^ /= R; the smoothing is undone row by row, A[i, :] = solve(W, A^[i, :]) with W[j, :] = w_j;
  A is shifted to be non-negative when it has a negative entry and divided by its sum;
- exponentiated gradient on the column sums: p <- p * exp(eta * colsum(A)) (cumulative), or with
  ``ema`` gamma, Abar = (1 - gamma) A + gamma Abar and p = exp(eta * colsum(Abar)); p /= sum(p);
- the rest of the round trains on p.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from mixtune.core import Strict
from mixtune.core.seeds import rng
from mixtune.strategy.mixing.base import Mixer, ProportionalRows, StageRows, register, shares


class AioliParams(Strict):
    """Aioli (Chen et al., 2025, arXiv:2411.05735, Alg. 1-2): proportions learned online from probes' loss drops."""

    name: Literal["aioli"] = "aioli"
    round_steps: int = Field(default=250, ge=1)
    """Optimizer steps per round (official ``update_steps``: 250)."""
    probe_rounds: int = Field(default=4, ge=1)
    """R, random orders of the groups probed per round (official 4)."""
    probe_steps: int = Field(default=6, ge=1)
    """s, training steps per probe (official 6 for 3 groups)."""
    one_hot: float = Field(default=0.5, gt=0, le=1)
    """f, the probed group's share in its smoothed one-hot mixture (official 0.5 for 3 groups)."""
    eta: float = Field(default=0.1, gt=0)
    """Exponentiated-gradient step size (official 0.1 for 3 groups)."""
    ema: float | None = Field(default=None, ge=0, le=1)
    """gamma of the moving average of A (None: cumulative updates, the README's first choice)."""
    validation: int = Field(default=32, ge=1)
    """Held-out examples per source for validation losses (taken out of the stage's training data)."""


def smoothed_one_hot(m: int, j: int, f: float) -> np.ndarray:
    """w_j: f on group j, (1 - f) / (m - 1) on each other group (a single group: just 1)."""
    if m == 1:
        return np.ones(1)
    w = np.full(m, (1 - f) / (m - 1))
    w[j] = f
    return w


def aioli_update(p: np.ndarray, a_hat: np.ndarray, f: float, eta: float, ema: float | None = None,
                 a_bar: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One Aioli round's proportions from the probed loss drops (Chen et al., 2025,
    arXiv:2411.05735, Alg. 1 lines 6-9; official ``aioli_trainer.py``).

    Args:
        p: the current proportions.
        a_hat: A^ averaged over the probe rounds, A^[i, j] = drop of group i's loss when probing j.
        f: the one-hot factor of the probes (its smoothing is undone; f = 1 needs none).
        eta: step size; ema: gamma of the moving average (None: cumulative); a_bar: the previous
            average (None in the first round).

    Returns:
        (new p, the A used: the average when ``ema`` is set, else this round's normalised A).
    """
    m = len(p)
    a = a_hat.astype(float)
    if f < 1 and m > 1:
        w = np.stack([smoothed_one_hot(m, j, f) for j in range(m)])  # W[j, :] = w_j
        a = np.stack([np.linalg.solve(w, row) for row in a])
    if a.min() < 0:
        a = a - a.min()
    if a.sum() > 0:
        a = a / a.sum()
    if ema is None:
        new = p * np.exp(eta * a.sum(0))
        used = a
    else:
        used = a if a_bar is None else (1 - ema) * a + ema * a_bar
        new = np.exp(eta * used.sum(0))
    return new / new.sum(), used


def describe(p: AioliParams, groups: list[str], steps: int | None) -> str:
    m = len(groups)
    probe = p.probe_rounds * m * p.probe_steps
    rounds = -(-steps // p.round_steps) if steps else None
    return (f"rounds of {p.round_steps} steps{f' ({rounds} rounds)' if rounds else ''}, each starting with "
            f"{p.probe_rounds} x {m} sources x {p.probe_steps} probe steps = {probe} steps "
            f"({probe / p.round_steps:.0%} of the round) and {p.probe_rounds * m + 1} validation passes")


class Aioli(Mixer):
    """Aioli (Chen et al., 2025, arXiv:2411.05735): each round probes every group, then trains on
    the proportions the probes' loss drops give (see the module docstring).

    Validation losses are wanted before step 0 of each round and after each probe.
    """

    def __init__(self, p: AioliParams, rows: StageRows) -> None:
        self.cfg, self.draw, self.names = p, ProportionalRows(rows), rows.groups.names
        self.seed, self.stage, self.m = rows.seed, rows.stage, len(self.names)
        self.p = np.full(self.m, 1 / self.m)
        self.a_hat = np.zeros((self.m, self.m))
        self.a_bar: np.ndarray | None = None
        self.last_loss: np.ndarray | None = None
        self.history: list[dict] = []  # per round: proportions after it, and the A used

    @property
    def probe_len(self) -> int:
        return self.cfg.probe_rounds * self.m * self.cfg.probe_steps

    def _order(self, round_index: int) -> list[int]:
        probes = rng(self.seed, "mixing-probes", self.stage, round_index)
        return [int(j) for _ in range(self.cfg.probe_rounds) for j in probes.permutation(self.m)]

    def mixture(self, step: int) -> np.ndarray:
        """Proportions for optimizer step ``step`` (0-based in the stage)."""
        k = step % self.cfg.round_steps
        if k < self.probe_len:
            j = self._order(step // self.cfg.round_steps)[k // self.cfg.probe_steps]
            return smoothed_one_hot(self.m, j, self.cfg.one_hot)
        return self.p

    def rows(self, step: int) -> list[int]:
        return self.draw.rows(self.mixture(step))

    def wants_validation(self, step: int, *, after: bool) -> bool:
        k = step % self.cfg.round_steps
        if not after:
            return k == 0
        return k < self.probe_len and k % self.cfg.probe_steps == self.cfg.probe_steps - 1

    def observe(self, step: int, losses: np.ndarray, *, after: bool) -> None:
        """Opens a round (``after`` False) or closes a probe; the last probe updates the proportions."""
        losses = np.asarray(losses, dtype=float)
        if not after:
            self.last_loss, self.a_hat = losses, np.zeros((self.m, self.m))
            return
        k = step % self.cfg.round_steps
        j = self._order(step // self.cfg.round_steps)[k // self.cfg.probe_steps]
        self.a_hat[:, j] += self.last_loss - losses
        self.last_loss = losses
        if k == self.probe_len - 1:  # the last probe of the round: update the proportions
            self.p, used = aioli_update(self.p, self.a_hat / self.cfg.probe_rounds, self.cfg.one_hot, self.cfg.eta,
                                        self.cfg.ema, self.a_bar)
            if self.cfg.ema is not None:
                self.a_bar = used
            self.history.append({"step": step + 1, "p": self.p.tolist(), "A": used.tolist()})

    def log(self, step: int) -> dict[str, float]:
        return shares(self.names, self.mixture(step))

    def summary(self) -> dict:
        return {"mixing_rounds": self.history, "groups": self.names} if self.history else {}

    def state_dict(self) -> dict:
        return self.draw.state_dict({
            "p": self.p.tolist(), "a_hat": self.a_hat.tolist(),
            "a_bar": None if self.a_bar is None else self.a_bar.tolist(),
            "last_loss": None if self.last_loss is None else self.last_loss.tolist(), "history": self.history})

    def load_state_dict(self, state: dict) -> None:
        own = self.draw.load_state_dict(state)
        self.p, self.a_hat = np.array(own["p"]), np.array(own["a_hat"])
        self.a_bar = None if own["a_bar"] is None else np.array(own["a_bar"])
        self.last_loss = None if own["last_loss"] is None else np.array(own["last_loss"])
        self.history = own["history"]


register("aioli", AioliParams, Aioli, describe=describe)
