"""``doremi``: stratified batches, the loss reweighted by DoReMi's alpha (Xie et al., 2023,
arXiv:2305.10429, Alg. 1, as the Aioli repository runs it).

Each step the per-group mean loss of the batch under the model and under a fixed ``reference``
model give the excess e_i = max(L_i - L_i^ref, 0); log alpha <- log alpha + mu e, alpha = softmax,
alpha <- (1 - eps) alpha + eps/m; the loss is sum_i alpha_i L_i. DoReMi's result is the time
average of alpha, for a later run with ``static`` proportions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from mixtune.core import Strict
from mixtune.strategy.mixing.base import Mixer, ProportionalRows, StageRows, register, shares, softmax


class DoremiParams(Strict):
    """DoReMi (Xie et al., 2023, arXiv:2305.10429, Alg. 1): loss weights from excess loss over a fixed reference model."""

    name: Literal["doremi"] = "doremi"
    reference: str
    """The reference model's folder (e.g. a stratified run's stage model); a relative path is taken
    from the folder mixtune runs in."""
    step_size: float = Field(default=0.01, gt=0)
    """mu, the step size of the log-weights (0.01 in every Aioli DoReMi script)."""
    smoothing: float = Field(default=1e-3, ge=0, lt=1)
    """eps, the uniform share mixed into alpha."""
    validation: int = Field(default=32, ge=1)
    """Held-out examples per source for validation losses (taken out of the stage's training data)."""

    @field_validator("reference")
    @classmethod
    def _exists(cls, v: str, info: ValidationInfo) -> str:
        # only for a recipe read from a file (configs built in code may name a folder made later)
        if (info.context or {}).get("base_dir") is not None and not Path(v).is_dir():
            raise ValueError(f"no model folder {v!r} (DoReMi's reference model, e.g. a stratified run's "
                             f"stages/<name>/; a relative path is taken from {Path.cwd()})")
        return v


def doremi_update(alpha: np.ndarray, excess: np.ndarray, step_size: float, smoothing: float) -> np.ndarray:
    """One DoReMi step (Xie et al., 2023, arXiv:2305.10429, Alg. 1 lines 8-9): excess losses
    clipped at 0, log alpha + mu * excess, softmax, then (1 - eps) alpha + eps / m."""
    a = softmax(np.log(alpha) + step_size * np.maximum(excess, 0.0))
    return (1 - smoothing) * a + smoothing / len(a)


class Doremi(Mixer):
    """DoReMi (Xie et al., 2023, arXiv:2305.10429): stratified batches, loss weights alpha updated
    from every batch's excess loss over the ``reference`` model (see the module docstring)."""

    def __init__(self, p: DoremiParams, rows: StageRows) -> None:
        self.cfg, self.draw, self.names = p, ProportionalRows(rows), rows.groups.names
        self.reference = p.reference
        m = len(self.names)
        self.p = np.full(m, 1 / m)
        self.alpha = np.full(m, 1 / m)
        self.alpha_sum, self.alpha_steps, self.last_excess = np.zeros(m), 0, np.zeros(m)

    def rows(self, step: int) -> list[int]:
        return self.draw.rows(self.p)

    def observe_batch(self, step: int, losses: np.ndarray, reference: np.ndarray) -> None:
        """A group without tokens in the batch (NaN) keeps its previous excess, as the Aioli code keeps
        the previous score."""
        excess = np.asarray(losses, dtype=float) - np.asarray(reference, dtype=float)
        missing = np.isnan(excess)
        excess[missing] = self.last_excess[missing]
        self.last_excess = excess
        self.alpha = doremi_update(self.alpha, excess, self.cfg.step_size, self.cfg.smoothing)
        self.alpha_sum += self.alpha
        self.alpha_steps += 1

    def loss_weights(self) -> np.ndarray:
        return self.alpha

    def average_alpha(self) -> np.ndarray:
        """DoReMi's output: alpha averaged over the steps so far."""
        return self.alpha_sum / max(1, self.alpha_steps)

    def log(self, step: int) -> dict[str, float]:
        return shares(self.names, self.alpha)

    def summary(self) -> dict:
        return {"doremi_average": self.average_alpha().tolist(), "groups": self.names}

    def state_dict(self) -> dict:
        return self.draw.state_dict({"alpha": self.alpha.tolist(), "alpha_sum": self.alpha_sum.tolist(),
                                     "alpha_steps": self.alpha_steps, "last_excess": self.last_excess.tolist()})

    def load_state_dict(self, state: dict) -> None:
        own = self.draw.load_state_dict(state)
        self.alpha, self.alpha_sum = np.array(own["alpha"]), np.array(own["alpha_sum"])
        self.alpha_steps, self.last_excess = own["alpha_steps"], np.array(own["last_excess"])


register("doremi", DoremiParams, Doremi)
