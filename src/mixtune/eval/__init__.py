"""The eval stage: batched generation and sampling, per-ability scores, abilities from files, pass@k."""

from mixtune.models.generate import generate, sample
from mixtune.eval.passk import mean_pass_at_k, pass_at_k
from mixtune.eval.run import (AbilityScore, ability_scorer, during_training, evaluate, load_for_eval, parse_abilities,
                              write_results)

__all__ = ["AbilityScore", "ability_scorer", "during_training", "evaluate", "generate", "load_for_eval", "mean_pass_at_k",
           "parse_abilities", "pass_at_k", "sample", "write_results"]
