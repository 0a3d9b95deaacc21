"""Mixture proportions of a stage's sources, fixed or updated while it trains (Aioli).

A stage with ``mixing`` draws every global batch by proportions p over its sources ("groups"),
p_j B rows of group j with the fractions carried from batch to batch (:func:`batch_counts`). With
``stratified`` p is uniform, with ``static`` it is given, with ``aioli`` it is learned online
(Chen et al., 2025, arXiv:2411.05735, Algorithms 1-2; official ``aioli_trainer.py``):

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

With ``doremi`` (Xie et al., 2023, arXiv:2305.10429, Alg. 1, as the Aioli repository runs it)
batches are stratified and the proportions alpha weight the loss instead: each step the
per-group mean loss of the batch under the model and under a fixed ``reference`` model give the
excess e_i = max(L_i - L_i^ref, 0); log alpha <- log alpha + mu e, alpha = softmax,
alpha <- (1 - eps) alpha + eps/m; the loss is sum_i alpha_i L_i. DoReMi's result is the time
average of alpha, for a later run with ``static`` proportions.

With ``coba`` (Gong et al., 2024, arXiv:2410.06741) batches keep the stage's natural proportions
and the loss is MFTCoder's case3 with CoBa's convergence-balanced task weights, from every step's
validation losses (see :func:`coba_weights`).

Validation losses come from held-out examples of each group (``validation`` per group, taken out
of the stage's training data).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from mixtune.core import ConfigError, Strict
from mixtune.core.seeds import rng


class MixingConfig(Strict):
    """How a stage's sources are mixed into batches while it trains."""

    name: Literal["stratified", "static", "aioli", "doremi", "coba"]
    """The mixing mode (see the module docstring and docs/methods.md)."""
    weights: dict[str, float] = {}
    """``static``: each source's proportion (normalised; sources not named get 0)."""
    round_steps: int = Field(default=250, ge=1)
    """``aioli``: optimizer steps per round (official ``update_steps``: 250)."""
    probe_rounds: int = Field(default=4, ge=1)
    """``aioli``: R, random orders of the groups probed per round (official 4)."""
    probe_steps: int = Field(default=6, ge=1)
    """``aioli``: s, training steps per probe (official 6 for 3 groups)."""
    one_hot: float = Field(default=0.5, gt=0, le=1)
    """``aioli``: f, the probed group's share in its smoothed one-hot mixture (official 0.5 for 3 groups)."""
    eta: float = Field(default=0.1, gt=0)
    """``aioli``: exponentiated-gradient step size (official 0.1 for 3 groups)."""
    ema: float | None = Field(default=None, ge=0, le=1)
    """``aioli``: gamma of the moving average of A (None: cumulative updates, the README's first choice)."""
    reference: str | None = None
    """``doremi``: the reference model's folder (e.g. a stratified run's stage model)."""
    step_size: float = Field(default=0.01, gt=0)
    """``doremi``: mu, the step size of the log-weights (0.01 in every Aioli DoReMi script)."""
    smoothing: float = Field(default=1e-3, ge=0, lt=1)
    """``doremi``: eps, the uniform share mixed into alpha."""
    warmup: int = Field(default=100, ge=2)
    """``coba``: steps with equal task weights before convergence balancing starts (official 100)."""
    history: int = Field(default=200, ge=2)
    """``coba``: validation-loss points the slopes are fitted on (official 200)."""
    tau: float = Field(default=5.0, gt=0)
    """``coba``: temperature of the divergence factor (official 5)."""
    validation: int = Field(default=32, ge=1)
    """Held-out examples per source for validation losses (taken out of the stage's training data)."""


def batch_counts(p: np.ndarray, batch_size: int, carry: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of each group in a batch of ``batch_size``, and the fractions carried to the next batch.

    Each group is owed carry_j + p_j B rows; it gets the floor of that, the rows left go to the
    largest remainders (ties to the earlier group), and what is still owed carries over. Over many
    steps every group gets its share of rows to within one. (The Aioli code gives floor(p_j B) and
    the last group the remainder, which at B = 8 and 3 groups turns uniform proportions into
    2, 2, 4 rows every step.)
    """
    owed = p * batch_size + (0 if carry is None else carry)
    counts = np.floor(owed + 1e-9).astype(int)
    short = batch_size - counts.sum()
    if short > 0:
        for j in np.argsort(-(owed - counts), kind="stable")[:short]:
            counts[j] += 1
    elif short < 0:  # carried debts can sum past the batch: take back from the most over-served
        for j in np.argsort(owed - counts, kind="stable")[:-short]:
            counts[j] -= 1
    return counts, owed - counts


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


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def doremi_update(alpha: np.ndarray, excess: np.ndarray, step_size: float, smoothing: float) -> np.ndarray:
    """One DoReMi step (Xie et al., 2023, arXiv:2305.10429, Alg. 1 lines 8-9): excess losses
    clipped at 0, log alpha + mu * excess, softmax, then (1 - eps) alpha + eps / m."""
    a = _softmax(np.log(alpha) + step_size * np.maximum(excess, 0.0))
    return (1 - smoothing) * a + smoothing / len(a)


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
    rcs = _softmax(k * current / max(np.abs(current).sum(), 1e-300))
    hist = task_slopes[:, start:]
    reverse = -hist.shape[1] * hist / np.maximum(np.abs(hist).sum(1, keepdims=True), 1e-300)
    acs = _softmax(reverse[:, -1])
    t = len(total_slopes)
    df = _softmax(-t * total_slopes / max(np.abs(total_slopes).sum(), 1e-300) * tau)[-1] * t
    w = _softmax(k * (df * rcs + (1 - df) * acs))
    floor = 1 / (10 * k)
    if (w < floor).any():
        w = w * (1 - floor * k) + floor
    return w


class OnlineMixer:
    """The proportions of every step of one stage, and when validation losses are needed.

    The trainer asks :meth:`mixture` for each step's proportions, calls :meth:`observe` with the
    groups' validation losses whenever :meth:`wants_eval` says so (before step 0 of each round and
    after each probe), and saves :meth:`state_dict` in checkpoints.
    """

    def __init__(self, cfg: MixingConfig, groups: list[str], seed: int, stage: int,
                 natural: list[int] | None = None) -> None:
        self.cfg, self.groups, self.m = cfg, groups, len(groups)
        self.seed, self.stage = seed, stage
        if cfg.name == "static":
            unknown = set(cfg.weights) - set(groups)
            if unknown or not any(cfg.weights.get(g, 0) > 0 for g in groups):
                raise ConfigError(f"mixing.weights {cfg.weights}: give positive weights for this stage's sources "
                                  f"({', '.join(groups)})")
            p = np.array([cfg.weights.get(g, 0.0) for g in groups], dtype=float)
            self.p = p / p.sum()
        else:
            self.p = np.full(self.m, 1 / self.m)
        natural = natural or [1] * len(groups)
        if cfg.name == "doremi" and not cfg.reference:
            raise ConfigError("mixing doremi needs `reference`: the folder of the reference model (e.g. a "
                              "stratified run's stage model)")
        self.alpha = np.full(self.m, 1 / self.m)  # doremi's loss weights
        self.alpha_sum, self.alpha_steps, self.last_excess = np.zeros(self.m), 0, np.zeros(self.m)
        self.coba_w = np.full(self.m, 1 / self.m)  # coba's loss weights
        self.coba_init: np.ndarray | None = None
        self.coba_losses: list[list[float]] = []
        self.coba_slopes: list[list[float]] = []
        self.coba_total: list[float] = []
        if cfg.name == "coba":  # sampling keeps the natural proportions; the loss is rebalanced
            self.p = np.array(natural, dtype=float) / sum(natural)
        self.a_hat = np.zeros((self.m, self.m))
        self.a_bar: np.ndarray | None = None
        self.last_loss: np.ndarray | None = None
        self.history: list[dict] = []  # per round: proportions after it, and the A used

    @property
    def probe_len(self) -> int:
        return self.cfg.probe_rounds * self.m * self.cfg.probe_steps if self.cfg.name == "aioli" else 0

    def _order(self, round_index: int) -> list[int]:
        probes = rng(self.seed, "mixing-probes", self.stage, round_index)
        return [int(j) for _ in range(self.cfg.probe_rounds) for j in probes.permutation(self.m)]

    def mixture(self, step: int) -> np.ndarray:
        """Proportions for optimizer step ``step`` (0-based in the stage)."""
        k = step % self.cfg.round_steps
        if self.cfg.name == "aioli" and k < self.probe_len:
            j = self._order(step // self.cfg.round_steps)[k // self.cfg.probe_steps]
            return smoothed_one_hot(self.m, j, self.cfg.one_hot)
        return self.p

    def wants_eval(self, step: int, after: bool) -> bool:
        """Whether validation losses are needed before (``after`` False) or after step ``step``."""
        if self.cfg.name == "coba":  # the initial losses, then every step
            return after or step == 0
        if self.cfg.name != "aioli":
            return False
        k = step % self.cfg.round_steps
        if not after:
            return k == 0
        return k < self.probe_len and k % self.cfg.probe_steps == self.cfg.probe_steps - 1

    def observe(self, step: int, losses: np.ndarray, after: bool) -> None:
        """Record the groups' validation losses (see :meth:`wants_eval`); closes probes and rounds."""
        losses = np.asarray(losses, dtype=float)
        if self.cfg.name == "coba":
            self._coba(step, losses, after)
            return
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

    def _coba(self, step: int, losses: np.ndarray, after: bool) -> None:
        """CoBa: validation losses relative to the stage's first, slopes over the recent history,
        task weights from the warm-up on (official ``CoBaStatus``, one update per step)."""
        if not after:
            if step == 0 and self.coba_init is None:
                self.coba_init = np.where(losses > 0, losses, 1.0)
            return
        self.coba_losses.append((losses / self.coba_init).tolist())
        done = step + 1
        if done < self.cfg.warmup:
            return
        start = max(0, done - self.cfg.history)
        x = np.arange(start, done, dtype=float)
        hist = np.array(self.coba_losses[-len(x):])  # (points, K)
        self.coba_slopes.append([slope(x, hist[:, i]) for i in range(self.m)])
        self.coba_total.append(slope(x, hist.max(1)))
        self.coba_w = coba_weights(np.array(self.coba_slopes).T, np.array(self.coba_total), start, self.cfg.tau)

    def loss_weights(self) -> np.ndarray | None:
        """Per-group loss weights (DoReMi's alpha, CoBa's w), or None when the loss is not reweighted."""
        if self.cfg.name == "doremi":
            return self.alpha
        return self.coba_w if self.cfg.name == "coba" else None

    def observe_excess(self, step: int, model_loss: np.ndarray, reference_loss: np.ndarray) -> None:
        """DoReMi: the batch's per-group mean losses under the model and the reference (NaN where a
        group had no tokens: its previous excess stands in, as the Aioli code keeps the previous score)."""
        excess = np.asarray(model_loss, dtype=float) - np.asarray(reference_loss, dtype=float)
        missing = np.isnan(excess)
        excess[missing] = self.last_excess[missing]
        self.last_excess = excess
        self.alpha = doremi_update(self.alpha, excess, self.cfg.step_size, self.cfg.smoothing)
        self.alpha_sum += self.alpha
        self.alpha_steps += 1

    def average_alpha(self) -> np.ndarray:
        """DoReMi's output: alpha averaged over the steps so far."""
        return self.alpha_sum / max(1, self.alpha_steps)

    def state_dict(self) -> dict:
        return {"alpha": self.alpha.tolist(), "alpha_sum": self.alpha_sum.tolist(), "alpha_steps": self.alpha_steps,
                "last_excess": self.last_excess.tolist(),
                "coba": {"w": self.coba_w.tolist(), "init": None if self.coba_init is None else self.coba_init.tolist(),
                         "losses": self.coba_losses, "slopes": self.coba_slopes, "total": self.coba_total},
                "p": self.p.tolist(), "a_hat": self.a_hat.tolist(),
                "a_bar": None if self.a_bar is None else self.a_bar.tolist(),
                "last_loss": None if self.last_loss is None else self.last_loss.tolist(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self.alpha_sum = np.array(state["alpha"]), np.array(state["alpha_sum"])
        self.alpha_steps, self.last_excess = state["alpha_steps"], np.array(state["last_excess"])
        c = state["coba"]
        self.coba_w, self.coba_losses, self.coba_slopes, self.coba_total = (np.array(c["w"]), c["losses"], c["slopes"],
                                                                              c["total"])
        self.coba_init = None if c["init"] is None else np.array(c["init"])
        self.p, self.a_hat = np.array(state["p"]), np.array(state["a_hat"])
        self.a_bar = None if state["a_bar"] is None else np.array(state["a_bar"])
        self.last_loss = None if state["last_loss"] is None else np.array(state["last_loss"])
        self.history = state["history"]
