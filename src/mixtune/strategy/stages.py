"""Strategies: plain functions that turn named sources into an ordered list of training stages.

The four strategies of the DMT study (Dong et al., 2024, arXiv:2310.05492, Sec. 3 and Fig. 2),
with D_general the general source and the others specialists:

=====================  ===========================================================================
``multi_task``         one stage: every source, all of it, shuffled together
``sequential``         one stage per source, in ``order`` (default: the order sources are listed)
``mixed_sequential``   specialists together, then the general source
``dmt``                specialists together, then general + fraction k of each specialist
                       (k = 0 is mixed-sequential; the paper reports k = 1/256)
=====================  ===========================================================================

Fractions follow the mixture table (mixtune.data.mixture): a fraction k takes
floor(k * |D|) examples of a specialist, drawn without replacement from the same data
stage 1 trained on. A recipe may instead list ``stages`` by hand.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from mixtune.core import ConfigError, Registry, Strict
from mixtune.data.mixture import MixtureConfig, Take
from mixtune.strategy.mixing import MixingConfig, check_mixing
from mixtune.strategy.objectives import ObjectiveConfig

Schedule = Literal["cosine", "linear", "constant"]
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


class StageConfig(Strict):
    """One training stage: a mixture, its length and (optionally) its own learning-rate schedule."""

    name: str
    """Short name, used for the stage's output folder."""
    mixture: MixtureConfig
    """What the stage trains on."""
    steps: int | None = Field(default=None, ge=1)
    """Optimizer steps (default: the training section's ``steps`` or ``epochs``)."""
    epochs: float | None = Field(default=None, gt=0)
    """Passes over the stage's packed rows, exclusive with ``steps``."""
    lr: float | None = Field(default=None, gt=0)
    """Peak learning rate for this stage (default: the training section's)."""
    schedule: Schedule | None = None
    """Learning-rate schedule for this stage (default: the training section's)."""
    mixing: MixingConfig | None = None
    """How the stage's sources are mixed into batches: a mixing mode, e.g. ``{name: stratified}``
    or ``{name: aioli}`` (default: the stage's rows shuffled together). See docs/methods.md."""
    objective: ObjectiveConfig | None = None
    """What the stage trains for after SFT: ``{name: rft}`` (rejection sampling), ``{name: dpo}``
    (DPO, IPO, SimPO) or ``{name: grpo}``, its mixture's records being prompts whose ability scores
    the completions (default: SFT on the records). See docs/training.md."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _STAGE_NAME.match(v):
            raise ValueError(f"stage name {v!r} may hold letters, digits and _ . + = - only (it names a folder)")
        return v

    @model_validator(mode="after")
    def _length(self) -> StageConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give at most one of steps and epochs")
        check_mixing(self.mixing, list(self.mixture.sources))  # e.g. static weights of sources not in the stage
        if self.objective is not None and self.mixing is not None:
            raise ValueError(f"objective {self.objective.name} draws its prompts shuffled; drop mixing")
        return self


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: its parameters and its plan function."""

    params: type[Strict]
    plan: Callable[..., list[StageConfig]]


STRATEGIES: Registry[Strategy] = Registry("strategy")


def register(name: str, params: type[Strict]) -> Callable:
    def wrap(fn: Callable[..., list[StageConfig]]) -> Callable[..., list[StageConfig]]:
        STRATEGIES.add(name, Strategy(params, fn), doc=fn.__doc__)
        return fn

    return wrap


def _split(sources: list[str], general: str) -> list[str]:
    if general not in sources:
        raise ConfigError(f"strategy.general = {general!r} is not a source; sources: {', '.join(sources)}")
    specialists = [s for s in sources if s != general]
    if not specialists:
        raise ConfigError(f"the strategy needs at least one specialist source besides {general!r}")
    return specialists


def _all(names: list[str]) -> MixtureConfig:
    return MixtureConfig(sources={n: None for n in names})


class MultiTaskParams(Strict):
    name: Literal["multi_task"] = "multi_task"
    mixing: MixingConfig | None = None
    """How the sources are mixed into batches, e.g. ``{name: stratified}``, ``{name: static, weights:
    ...}`` or ``{name: aioli}`` (default: all rows shuffled together). See docs/methods.md."""


@register("multi_task", MultiTaskParams)
def multi_task(p: MultiTaskParams, sources: list[str]) -> list[StageConfig]:
    """Multi-task learning (Dong et al., 2024, arXiv:2310.05492): SFT on the union of all sources."""
    try:  # checked here so the message names the key (the stage below is built from code)
        check_mixing(p.mixing, sources)
    except ValueError as e:
        raise ConfigError(f"strategy.{e}") from None
    return [StageConfig(name="multi_task", mixture=_all(sources), mixing=p.mixing)]


class SequentialParams(Strict):
    name: Literal["sequential"] = "sequential"
    order: list[str] | None = None
    """Sources in training order (default: as listed under ``sources``); a subset is allowed."""


@register("sequential", SequentialParams)
def sequential(p: SequentialParams, sources: list[str]) -> list[StageConfig]:
    """Sequential training (Dong et al., 2024, arXiv:2310.05492): one stage per source, in order."""
    order = p.order or sources
    unknown = [s for s in order if s not in sources]
    if unknown:
        raise ConfigError(f"strategy.order names {', '.join(unknown)}, not sources ({', '.join(sources)})")
    if len(set(order)) != len(order):
        raise ConfigError(f"strategy.order repeats a source: {order}")
    return [StageConfig(name=f"{i + 1}-{s}", mixture=_all([s])) for i, s in enumerate(order)]


class MixedSequentialParams(Strict):
    name: Literal["mixed_sequential"] = "mixed_sequential"
    general: str = "general"
    """The general source, trained last; every other source is a specialist."""


@register("mixed_sequential", MixedSequentialParams)
def mixed_sequential(p: MixedSequentialParams, sources: list[str]) -> list[StageConfig]:
    """Mixed sequential training (Dong et al., 2024, arXiv:2310.05492): specialists together, then general."""
    specialists = _split(sources, p.general)
    return [StageConfig(name="1-specialists", mixture=_all(specialists)),
            StageConfig(name="2-general", mixture=_all([p.general]))]


class DmtParams(Strict):
    name: Literal["dmt"] = "dmt"
    k: float = Field(default=1 / 256, ge=0, le=1)
    """Fraction of each specialist source replayed in stage 2 (paper: 1/256)."""
    general: str = "general"
    """The general source of stage 2; every other source is a specialist."""


@register("dmt", DmtParams)
def dmt(p: DmtParams, sources: list[str]) -> list[StageConfig]:
    """Dual-stage Mixed Fine-tuning (Dong et al., 2024, arXiv:2310.05492, Sec. 4):
    SFT(D_code u D_math) -> SFT(D_general u S_k(D_code) u S_k(D_math)), |S_k(D)| = floor(k |D|)."""
    specialists = _split(sources, p.general)
    replay = {s: Take(fraction=p.k) for s in specialists} if p.k > 0 else {}
    return [StageConfig(name="1-specialists", mixture=_all(specialists)),
            StageConfig(name=f"2-general+k={p.k:.4g}",
                        mixture=MixtureConfig(sources={p.general: None, **replay}))]


class PostSftParams(Strict):
    name: Literal["post_sft"] = "post_sft"
    sft: list[str] = Field(min_length=1)
    """The sources SFT trains on first, together (in a study, the same stage as the run that trains
    exactly them: ``[math]`` is ``specialist:math``'s, every source is ``multi_task``'s; trained once)."""
    objective: ObjectiveConfig | None = None
    """The stage after SFT, e.g. ``{name: grpo, group: 8}`` (None: SFT alone). In a study, a list
    gives one run per objective."""
    prompts: list[str] | None = None
    """The sources whose records are the objective's prompts (default: ``sft``)."""
    steps: int | None = Field(default=None, ge=1)
    """Optimizer steps of the objective stage (default: ``train.steps``, else ``train.epochs`` over
    its prompts)."""
    lr: float | None = Field(default=None, gt=0)
    """Peak learning rate of the objective stage (default: the training section's; RL and
    preference stages usually want a smaller one than SFT)."""


@register("post_sft", PostSftParams)
def post_sft(p: PostSftParams, sources: list[str]) -> list[StageConfig]:
    """SFT, then a stage after SFT (rejection sampling: Yuan et al., 2023, arXiv:2308.01825; DPO:
    Rafailov et al., 2023; GRPO: Shao et al., 2024): ``1-<sft sources>`` on the ``sft`` sources,
    then ``2-<objective>`` on the ``prompts`` sources' records."""
    prompts = p.prompts or p.sft
    unknown = [s for s in dict.fromkeys([*p.sft, *prompts]) if s not in sources]
    if unknown:
        raise ConfigError(f"strategy post_sft names {', '.join(unknown)}, not sources ({', '.join(sources)})")
    stages = [StageConfig(name="1-" + "+".join(p.sft), mixture=_all(p.sft))]
    if p.objective is not None:
        stages.append(StageConfig(name=f"2-{p.objective.name}", mixture=_all(prompts), objective=p.objective,
                                  steps=p.steps, lr=p.lr))
    return stages


StrategyConfig = Annotated[
    Union[tuple(STRATEGIES.get(n).params for n in STRATEGIES)],  # type: ignore[misc]
    Field(discriminator="name"),
]


def plan_stages(strategy: Strict, sources: list[str]) -> list[StageConfig]:
    """The stages a strategy config produces for the given source names."""
    return STRATEGIES.get(strategy.name).plan(strategy, sources)  # type: ignore[attr-defined]


__all__ = ["STRATEGIES", "Schedule", "StageConfig", "StrategyConfig", "plan_stages"]
