"""Stage objectives after supervised fine-tuning: what a stage's ``objective`` may be.

A stage without ``objective`` is SFT on its packed rows. With one, its mixture's records are
*prompts* (their last assistant turn is the gold reply, their ``ability`` names the scorer that
rewards a completion, or the objective's ``reward`` says how to score it), and the stage trains by:

========  ==============================================================================
``rft``   rejection sampling (Yuan et al., 2023, arXiv:2308.01825): k samples per prompt from
          the stage's starting model, those its ability's scorer accepts (distinct, at most
          ``keep`` per prompt) become SFT data, with the gold replies (``gold: true``); the
          S3FT variant (Gupta et al., 2024, arXiv:2409.04787) keeps one reply per prompt, the
          model's own when it is correct, else the gold one
``dpo``   DPO (Rafailov et al., 2023, arXiv:2305.18290), IPO or SimPO on preference pairs: a
          file's (``prompt``/``chosen``/``rejected``, TRL's convention) or, for prompts without
          a rejected reply, pairs built on-policy from scored samples (a correct one chosen, an
          incorrect one rejected; Tajwar et al., 2024, arXiv:2404.14367)
``grpo``  GRPO (Shao et al., 2024, arXiv:2402.03300): G samples per prompt from the current
          policy every step, rewards from the scorer, advantages normalised within the group,
          the clipped ratio and a k3 KL to the stage's starting model
========  ==============================================================================

An objective stage's length counts **prompts**: ``steps``, else ceil(epochs x prompts /
batch), where batch is ``train.batch_size`` rows (rft, dpo) or ``prompts`` per step (grpo), since
what rft and on-policy dpo train on is known only once the stage has sampled it. Iterated
rejection sampling is several ``rft`` stages in a row: each samples from the model the one
before left. Sampling runs on the batched, KV-cached generation of evaluation
(:mod:`mixtune.models.generate`), each completion on its own seeded stream, so a resumed stage
samples what it sampled before.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from mixtune.core import ConfigError, Strict
from mixtune.data.scorers import ScorerParams, check_scorer


class Sampling(Strict):
    """How completions are sampled from the model (seeded, one stream per completion)."""

    temperature: float = Field(default=1.0, gt=0)
    """Softmax temperature (RFT: 0.7 in Yuan et al.; GRPO: 1.0 as DeepSeekMath and TRL)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling mass (1 keeps every token)."""
    top_k: int = Field(default=0, ge=0)
    """Keep the k most likely tokens (0 keeps all)."""
    max_new_tokens: int | None = Field(default=None, ge=1)
    """Generation budget per completion (default: as evaluation's, 4x the longest gold reply, at least 128)."""
    batch_size: int = Field(default=64, ge=1)
    """Completions per generation batch."""


class Reward(Strict):
    """How a completion is rewarded when the prompts are the user's own: a scorer over a record
    field, as a task file scores (:mod:`mixtune.data.scorers`)."""

    scorer: str = "exact"
    """``exact``, ``numeric``, ``regex``, ``contains`` or ``package.module:function``, called as
    ``function(completion, record) -> float`` (a reward in [0, 1]; 1 is "accepted" for rft and dpo)."""
    references: str = "answer"
    """The record field holding the reference answer (a string or a list of accepted strings)."""
    scorer_options: ScorerParams = ScorerParams()
    """Options of the built-in scorers (case, punctuation, which number, the regex)."""

    @model_validator(mode="after")
    def _known(self) -> Reward:
        try:
            check_scorer(self.scorer)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self


class RftParams(Strict):
    name: Literal["rft"] = "rft"
    reward: Reward | None = None
    """How a completion is scored (default: its record's built-in ability's scorer)."""
    samples: int = Field(default=4, ge=1)
    """k, completions sampled per prompt (Yuan et al. sample 100 on GSM8K; a few suffice to see the effect)."""
    keep: int | None = Field(default=None, ge=1)
    """Most accepted completions kept per prompt, after removing duplicates (default: every distinct one)."""
    gold: bool = True
    """Train on the gold replies too (Yuan et al. add the distinct correct paths to the SFT data)."""
    s3ft: bool = False
    """S3FT: one reply per prompt, the model's first correct sample, else the gold reply (``keep``
    and ``gold`` do not apply)."""
    sampling: Sampling = Sampling(temperature=0.7)
    """How the completions are sampled."""

    @model_validator(mode="after")
    def _s3ft(self) -> RftParams:
        if self.s3ft and self.keep is not None:
            raise ValueError("s3ft keeps one reply per prompt; drop keep")
        return self


class DpoParams(Strict):
    name: Literal["dpo"] = "dpo"
    reward: Reward | None = None
    """How an on-policy completion is scored (default: its record's built-in ability's scorer)."""
    loss: Literal["dpo", "ipo", "simpo"] = "dpo"
    """``dpo`` (sigmoid, Rafailov et al.), ``ipo`` (Azar et al., 2023, arXiv:2310.12036, on mean
    token log-probabilities as TRL) or ``simpo`` (Meng et al., 2024, arXiv:2405.14734: no
    reference model, length-normalised, with a margin)."""
    beta: float | None = Field(default=None, gt=0)
    """beta (default: 0.1 for dpo and ipo (IPO's tau), 2.0 for simpo)."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    """dpo: the probability a preference label is flipped (conservative DPO; TRL's label_smoothing)."""
    gamma_beta_ratio: float = Field(default=0.5, ge=0)
    """simpo: the target margin gamma / beta (SimPO's default 0.5)."""
    samples: int = Field(default=4, ge=2)
    """On-policy pairs: completions sampled per prompt that has no ``rejected`` reply."""
    sampling: Sampling = Sampling()
    """How on-policy completions are sampled."""


class GrpoParams(Strict):
    name: Literal["grpo"] = "grpo"
    reward: Reward | None = None
    """How a completion is scored (default: its record's built-in ability's scorer)."""
    group: int = Field(default=8, ge=2)
    """G, completions sampled per prompt (DeepSeekMath: 64; TRL's default 8)."""
    prompts: int = Field(default=8, ge=1)
    """Prompts per optimizer step, over all processes (so a step trains on prompts x group completions)."""
    beta: float = Field(default=0.04, ge=0)
    """KL coefficient to the stage's starting model (DeepSeekMath: 0.04; 0 keeps no reference)."""
    epsilon: float = Field(default=0.2, gt=0, lt=1)
    """Clip range of the ratio (PPO's 0.2)."""
    epsilon_high: float | None = Field(default=None, gt=0)
    """Upper clip (DAPO's clip-higher, e.g. 0.28; default: epsilon)."""
    aggregation: Literal["sequence", "token", "constant"] = "sequence"
    """How token losses make the loss: ``sequence`` (the paper: mean over completions of each one's
    token mean; TRL's grpo), ``token`` (over every completion token of the step; TRL's dapo) or
    ``constant`` (Dr. GRPO: divided by completions x max_new_tokens)."""
    scale_rewards: bool = True
    """Divide advantages by the group's standard deviation (False: Dr. GRPO's mean baseline only)."""
    sampling: Sampling = Sampling()
    """How the group's completions are sampled."""


ObjectiveConfig = Annotated[Union[RftParams, DpoParams, GrpoParams], Field(discriminator="name")]


def objective_batch(objective: RftParams | DpoParams | GrpoParams, batch_size: int) -> int:
    """Prompts (or pairs) per optimizer step of an objective stage, for its length."""
    return objective.prompts if isinstance(objective, GrpoParams) else batch_size


__all__ = ["DpoParams", "GrpoParams", "ObjectiveConfig", "Reward", "RftParams", "Sampling", "objective_batch"]
