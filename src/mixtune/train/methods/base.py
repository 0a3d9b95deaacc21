"""What a tuning method is: typed params, a ``prepare`` that readies the model, an ``export``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtune.core import Registry, Strict


@dataclass(frozen=True)
class Tuner:
    """A registered tuning method.

    ``prepare(model, params, seed) -> model`` marks what trains (or injects adapters) before
    training; ``export(model, params, out_dir, state_dict)`` writes the trained model in the
    form the ecosystem loads (a Hugging Face folder, or a peft adapter).
    """

    params: type[Strict]
    prepare: Callable[[Any, Any, int], Any]
    export: Callable[[Any, Any, Path, dict | None], None]


TUNERS: Registry[Tuner] = Registry("tuning method")


def register(name: str, params: type[Strict], *, prepare: Callable, export: Callable) -> Tuner:
    """Register a method; its citation (if any) is the ``prepare`` docstring."""
    return TUNERS.add(name, Tuner(params, prepare, export), doc=prepare.__doc__)
