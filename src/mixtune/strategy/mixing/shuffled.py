"""``shuffled``: the stage's rows shuffled together, one seeded permutation per epoch (no mixing).

A stage without ``mixing`` runs this mode.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from mixtune.core import Strict
from mixtune.core.seeds import rng
from mixtune.strategy.mixing.base import Mixer, StageRows, register


class ShuffledParams(Strict):
    """The stage's rows shuffled together (the same as no ``mixing``)."""

    name: Literal["shuffled"] = "shuffled"


class Shuffled(Mixer):
    """Global batches of row indices: epoch e walks the rows in permutation(seed, stage, e)
    (stream ``batch-order``)."""

    def __init__(self, p: ShuffledParams, rows: StageRows) -> None:
        self.n_rows, self.batch_size, self.seed, self.stage = rows.n_rows, rows.batch_size, rows.seed, rows.stage
        self._perms: dict[int, np.ndarray] = {}

    def rows(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, i = divmod(pos, self.n_rows)
            if epoch not in self._perms:
                self._perms = {epoch: rng(self.seed, "batch-order", self.stage, epoch).permutation(self.n_rows)}
            out.append(int(self._perms[epoch][i]))
        return out


register("shuffled", ShuffledParams, Shuffled, grouped=False)
