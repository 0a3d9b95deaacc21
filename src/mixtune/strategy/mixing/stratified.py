"""``stratified``: every group in equal proportion, p = 1/m each."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from mixtune.core import Strict
from mixtune.strategy.mixing.base import FixedProportions, StageRows, register


class StratifiedParams(Strict):
    """Uniform proportions over the stage's sources."""

    name: Literal["stratified"] = "stratified"
    validation: int = Field(default=32, ge=1)
    """Held-out examples per source for validation losses (taken out of the stage's training data)."""


class Stratified(FixedProportions):
    """Stratified sampling: each batch takes B/m rows of each of the m groups (fractions carried over)."""

    def __init__(self, p: StratifiedParams, rows: StageRows) -> None:
        super().__init__(rows)
        self.p = np.full(len(self.names), 1 / len(self.names))


register("stratified", StratifiedParams, Stratified)
