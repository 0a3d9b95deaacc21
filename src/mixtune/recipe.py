"""The recipe: one YAML file that says what to run. Sections belong to the pipeline stages."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from mixtune.core import ConfigError, Strict, load_config
from mixtune.data.format import FormatConfig
from mixtune.data.mixture import MixtureConfig
from mixtune.data.sources import SourceConfig
from mixtune.models import SIZES, LoadConfig
from mixtune.strategy import StageConfig, StrategyConfig, plan_stages
from mixtune.strategy.stages import MultiTaskParams
from mixtune.train.config import RunOptions, TrainConfig


class Recipe(Strict):
    """A mixtune recipe."""

    DOCS: ClassVar[str] = "docs/recipes.md"

    seed: int = 0
    """Seed for data generation, sampling, initialisation and training."""
    model: str = "builtin:tiny"
    """``builtin:tiny`` / ``builtin:small`` (built locally), or a local Hugging Face folder."""
    load: LoadConfig = LoadConfig()
    """How the starting model is loaded: dtype (default: the checkpoint's own, kept by every export),
    attention kernel, quantisation for QLoRA, e.g. ``{dtype: bf16, quantization: 4bit}``."""
    sources: dict[str, SourceConfig] = Field(min_length=1)
    """Named data sources."""
    format: FormatConfig = FormatConfig()
    """Rendering and packing."""
    prefix: list[StageConfig] = []
    """Stages trained first, before the others (e.g. the demo's pretraining on copying and number facts);
    sources named only here are left out of the strategy."""
    strategy: StrategyConfig | None = None
    """How sources become stages: ``{name: dmt, k: 0.125}`` etc. (default: multi_task)."""
    stages: list[StageConfig] | None = None
    """Stages listed by hand, instead of a strategy."""
    mixture: MixtureConfig | None = None
    """A one-stage recipe: what its single stage (named ``mixture``) takes from each source, instead
    of a strategy or stages."""
    train: TrainConfig = TrainConfig()
    """How each stage is trained (everything here decides the weights)."""
    run: RunOptions = RunOptions()
    """How the run goes: logging, checkpoint cadence, evaluations during training (never the weights)."""

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v.startswith("builtin:") and v.removeprefix("builtin:") not in SIZES:
            raise ValueError(f"unknown built-in model {v!r}; choose builtin:{' or builtin:'.join(SIZES)}")
        return v

    @model_validator(mode="after")
    def _quantized(self) -> Recipe:
        from mixtune.train.methods.base import refuse_quantized

        try:  # before any model is loaded
            refuse_quantized(self.load.quantization, self.train.method.name)
        except ConfigError as e:
            raise ValueError(str(e)) from None  # pydantic names the place in the file
        return self

    @model_validator(mode="after")
    def _stages(self) -> Recipe:
        given = [k for k in ("strategy", "stages", "mixture") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of `strategy`, `stages` or `mixture`, not {' and '.join(given)}")
        stages = [*self.prefix, *(self.stages or [])]
        if self.mixture is not None:
            stages.append(StageConfig(name="mixture", mixture=self.mixture))
        for stage in stages:
            unknown = [n for n in stage.mixture.sources if n not in self.sources]
            if unknown:
                raise ValueError(f"stage {stage.name!r} names {', '.join(unknown)}, not defined under sources "
                                 f"(defined: {', '.join(self.sources)})")
        names = [s.name for s in self.resolved_stages()]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique (they name folders): {names}")
        return self

    def resolved_stages(self) -> list[StageConfig]:
        """The prefix, then the hand-listed stages, the one ``mixture`` stage, or those the strategy
        (default multi_task) plans over the sources the prefix does not use alone."""
        if self.stages is not None:
            return [*self.prefix, *self.stages]
        if self.mixture is not None:
            return [*self.prefix, StageConfig(name="mixture", mixture=self.mixture)]
        prefix_only = {s for st in self.prefix for s in st.mixture.sources}
        composed = [s for s in self.sources if s not in prefix_only]
        return [*self.prefix, *plan_stages(self.strategy or MultiTaskParams(), composed)]


def load_recipe(path: str | os.PathLike, overrides: dict | None = None) -> tuple[Recipe, Path]:
    """The validated recipe and the folder its relative paths are taken from.

    Raises:
        ConfigError: every problem of the recipe at once, each with its line, including data
            files that do not exist (so nothing is written before they are found).
    """
    base_dir = Path(path).resolve().parent
    return load_config(Recipe, path, overrides, context={"base_dir": base_dir}), base_dir
