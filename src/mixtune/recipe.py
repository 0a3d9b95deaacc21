"""The recipe: one YAML file that says what to run. Sections belong to the pipeline stages."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from mixtune.core import Strict, load_config
from mixtune.data.format import FormatConfig
from mixtune.data.mixture import MixtureConfig
from mixtune.data.sources import SourceConfig
from mixtune.models import SIZES


class Recipe(Strict):
    """A mixtune recipe."""

    seed: int = 0
    """Seed for data generation, sampling and training."""
    model: str = "builtin:tiny"
    """``builtin:tiny`` / ``builtin:small`` (built locally), or a local Hugging Face folder."""
    sources: dict[str, SourceConfig] = Field(min_length=1)
    """Named data sources."""
    format: FormatConfig = FormatConfig()
    """Rendering and packing."""
    mixture: MixtureConfig | None = None
    """How much of each source to take (default: all of every source)."""

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v.startswith("builtin:") and v.removeprefix("builtin:") not in SIZES:
            raise ValueError(f"unknown built-in model {v!r}; choose builtin:{' or builtin:'.join(SIZES)}")
        return v

    @model_validator(mode="after")
    def _mixture_sources(self) -> Recipe:
        if self.mixture is not None:
            unknown = [n for n in self.mixture.sources if n not in self.sources]
            if unknown:
                raise ValueError(
                    f"mixture.sources names {', '.join(unknown)}, not defined under sources "
                    f"(defined: {', '.join(self.sources)})"
                )
        return self

    def resolved_mixture(self) -> MixtureConfig:
        """The mixture, or all of every source when none is given."""
        return self.mixture or MixtureConfig(sources={n: None for n in self.sources})


def load_recipe(path: str | os.PathLike, overrides: dict | None = None) -> tuple[Recipe, Path]:
    """The validated recipe and the folder its relative paths are taken from."""
    return load_config(Recipe, path, overrides), Path(path).resolve().parent
