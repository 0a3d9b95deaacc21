"""Mixing modes, one module each; importing this package registers them in :data:`MIXING_MODES`.

A stage's ``mixing`` names its mode: ``shuffled`` (the default: the stage's rows shuffled
together), ``stratified``, ``static``, ``aioli``, ``doremi`` or ``coba`` (docs/methods.md). The loop
talks to a mode only through :class:`Mixer`.
"""

from typing import Annotated, Union

from pydantic import Field

from mixtune.core import Strict
# registration, in the order `mixtune list` and docs/recipes.md show them
from mixtune.strategy.mixing import shuffled, stratified, static, aioli, doremi, coba  # noqa: F401, I001
from mixtune.strategy.mixing.base import MIXING_MODES, Groups, Mixer, MixingMode, StageRows, batch_counts

MixingConfig = Annotated[
    Union[tuple(MIXING_MODES.get(n).params for n in MIXING_MODES)],  # type: ignore[misc]
    Field(discriminator="name"),
]


def grouped(cfg: Strict | None) -> bool:
    """Whether a stage with mixing ``cfg`` packs its sources apart, with held-out validation rows."""
    return cfg is not None and MIXING_MODES.get(cfg.name).grouped  # type: ignore[attr-defined]


def check_mixing(cfg: Strict | None, sources: list[str]) -> None:
    """The mode's recipe-time check against the stage's sources (raises ``ValueError``)."""
    if cfg is not None and (check := MIXING_MODES.get(cfg.name).check) is not None:  # type: ignore[attr-defined]
        check(cfg, sources)


def make_mixer(cfg: Strict | None, rows: StageRows) -> Mixer:
    """The mixer of one stage (``cfg`` None: ``shuffled``)."""
    mode = MIXING_MODES.get(cfg.name if cfg is not None else "shuffled")  # type: ignore[attr-defined]
    return mode.mixer(cfg if cfg is not None else mode.params(), rows)


__all__ = ["MIXING_MODES", "Groups", "Mixer", "MixingConfig", "MixingMode", "StageRows", "batch_counts",
           "check_mixing", "grouped", "make_mixer"]
