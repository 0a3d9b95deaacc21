"""The eval stage: batched generation and per-ability scores."""

from mixtune.eval.generate import generate
from mixtune.eval.run import AbilityScore, ability_scorer, evaluate, load_for_eval, parse_abilities, write_results

__all__ = ["AbilityScore", "ability_scorer", "evaluate", "generate", "load_for_eval", "parse_abilities", "write_results"]
