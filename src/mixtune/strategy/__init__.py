"""The strategy stage: turn sources into an ordered list of training stages."""

from mixtune.strategy.stages import STRATEGIES, Schedule, StageConfig, StrategyConfig, plan_stages

__all__ = ["STRATEGIES", "Schedule", "StageConfig", "StrategyConfig", "plan_stages"]
