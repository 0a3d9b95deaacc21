"""``static``: fixed proportions, given per source and normalised."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from mixtune.core import ConfigError, Strict
from mixtune.strategy.mixing.base import FixedProportions, StageRows, register


class StaticParams(Strict):
    """Fixed proportions over the stage's sources."""

    name: Literal["static"] = "static"
    weights: dict[str, float] = {}
    """Each source's proportion (normalised; sources not named get 0)."""
    validation: int = Field(default=32, ge=1)
    """Held-out examples per source for validation losses (taken out of the stage's training data)."""


def check(p: StaticParams, sources: list[str]) -> None:
    """The weights name only the stage's sources and give one of them a positive weight."""
    unknown = set(p.weights) - set(sources)
    if unknown or not any(p.weights.get(g, 0) > 0 for g in sources):
        raise ValueError(f"mixing.weights {p.weights}: give positive weights for this stage's sources "
                         f"({', '.join(sources)})")


def describe(p: StaticParams, groups: list[str], steps: int | None) -> str:
    return "proportions " + ", ".join(f"{g} {p.weights.get(g, 0) / sum(p.weights.values()):.2f}" for g in groups)


class Static(FixedProportions):
    """Fixed proportions p_j = weights_j / sum(weights) (e.g. DoReMi's averaged alpha, or DMT's shares)."""

    def __init__(self, p: StaticParams, rows: StageRows) -> None:
        super().__init__(rows)
        try:  # the recipe was checked against the stage's sources; one may still have no examples here
            check(p, self.names)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        w = np.array([p.weights.get(g, 0.0) for g in self.names], dtype=float)
        self.p = w / w.sum()


register("static", StaticParams, Static, check=check, describe=describe)
