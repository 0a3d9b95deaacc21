"""The recipe: one YAML file that says what to run. Sections belong to the pipeline stages."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from mixtune.core import Strict, load_config
from mixtune.data.format import FormatConfig
from mixtune.data.sources import SourceConfig
from mixtune.models import SIZES
from mixtune.strategy import StageConfig, StrategyConfig, plan_stages
from mixtune.strategy.stages import MultiTaskParams
from mixtune.train.config import TrainConfig


class Recipe(Strict):
    """A mixtune recipe."""

    seed: int = 0
    """Seed for data generation, sampling, initialisation and training."""
    model: str = "builtin:tiny"
    """``builtin:tiny`` / ``builtin:small`` (built locally), or a local Hugging Face folder."""
    sources: dict[str, SourceConfig] = Field(min_length=1)
    """Named data sources."""
    format: FormatConfig = FormatConfig()
    """Rendering and packing."""
    strategy: StrategyConfig | None = None
    """How sources become stages: ``{name: dmt, k: 0.125}`` etc. (default: multi_task)."""
    stages: list[StageConfig] | None = None
    """Stages listed by hand, instead of a strategy."""
    train: TrainConfig = TrainConfig()
    """How each stage is trained."""

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v.startswith("builtin:") and v.removeprefix("builtin:") not in SIZES:
            raise ValueError(f"unknown built-in model {v!r}; choose builtin:{' or builtin:'.join(SIZES)}")
        return v

    @model_validator(mode="after")
    def _stages(self) -> Recipe:
        if self.strategy is not None and self.stages is not None:
            raise ValueError("give either `strategy` or `stages`, not both")
        for stage in self.stages or []:
            unknown = [n for n in stage.mixture.sources if n not in self.sources]
            if unknown:
                raise ValueError(f"stage {stage.name!r} names {', '.join(unknown)}, not defined under sources "
                                 f"(defined: {', '.join(self.sources)})")
        names = [s.name for s in self.stages or []]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique (they name folders): {names}")
        return self

    def resolved_stages(self) -> list[StageConfig]:
        """The hand-listed stages, or those the strategy (default multi_task) plans."""
        if self.stages is not None:
            return self.stages
        return plan_stages(self.strategy or MultiTaskParams(), list(self.sources))


def load_recipe(path: str | os.PathLike, overrides: dict | None = None) -> tuple[Recipe, Path]:
    """The validated recipe and the folder its relative paths are taken from."""
    return load_config(Recipe, path, overrides), Path(path).resolve().parent
