"""``stratified``: every group in equal proportion, p = 1/m each."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from mixtune.core import Strict
from mixtune.strategy.mixing.base import Mixer, ProportionalRows, StageRows, register, shares


class StratifiedParams(Strict):
    """Uniform proportions over the stage's sources."""

    name: Literal["stratified"] = "stratified"
    validation: int = Field(default=32, ge=1)
    """Held-out examples per source for validation losses (taken out of the stage's training data)."""


class Stratified(Mixer):
    """Stratified sampling: each batch takes B/m rows of each of the m groups (fractions carried over)."""

    def __init__(self, p: StratifiedParams, rows: StageRows) -> None:
        self.draw, self.names = ProportionalRows(rows), rows.groups.names
        self.p = np.full(len(self.names), 1 / len(self.names))

    def rows(self, step: int) -> list[int]:
        return self.draw.rows(self.p)

    def log(self, step: int) -> dict[str, float]:
        return shares(self.names, self.p)

    def state_dict(self) -> dict:
        return self.draw.state_dict({})

    def load_state_dict(self, state: dict) -> None:
        self.draw.load_state_dict(state)


register("stratified", StratifiedParams, Stratified)
