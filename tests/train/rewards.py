"""Rewards by dotted path (``objective.reward.scorer: tests.train.rewards:NAME``) for the tests of
the stages after SFT: what the tiny untrained model can earn."""


def even_length(completion: str, record: dict) -> float:
    """Half the samples earn it, whatever the model."""
    return float(len(completion) % 2 == 0)


def short(completion: str, record: dict) -> float:
    """Stop early: the untrained model's samples run to the budget at first."""
    return float(len(completion) < 12)
