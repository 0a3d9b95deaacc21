"""Completions of a stage's prompts, sampled and scored: the sampler and the verifiable rewards of
the stages after SFT (:mod:`mixtune.strategy.objectives`).

A prompt is a record's conversation without its last assistant turn, rendered as evaluation
renders it (:func:`mixtune.data.format.prompt_text`); its reward is its ability's exact scorer
(:mod:`mixtune.data.abilities`) on the completion, 1 when the answer is right, else 0, or the
objective's ``reward`` (a scorer over a field of the user's records, or the user's function). Sampling is
:func:`mixtune.models.generate.sample`: batched, KV-cached, and each completion drawn from its own
stream of (seed, sample index, prompt), so it does not depend on batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mixtune.core import ConfigError, DataError
from mixtune.data.abilities import ABILITIES
from mixtune.data.format import Example, prompt_text
from mixtune.data.scorers import SCORERS, user_scorer
from mixtune.strategy.objectives import Reward, Sampling
from mixtune.train.losses import IGNORE


def check_rewardable(records: Sequence[dict], stage: str, how: Reward | None = None) -> None:
    """Raise :class:`ConfigError` unless every record is a conversation that ``how`` can score:
    without ``how``, its ability must be a built-in one; with a built-in scorer, it must have the
    ``references`` field."""
    if any("messages" not in r for r in records):
        raise ConfigError(f"stage {stage!r}: its objective samples replies to prompts, and raw-text records have none")
    if how is None:
        names = sorted({r.get("ability", "?") for r in records} - set(ABILITIES))
        if names:
            raise ConfigError(f"stage {stage!r}: its objective rewards completions with their ability's scorer, and "
                              f"{', '.join(map(repr, names))} has none; take prompts from built-in abilities "
                              f"({', '.join(ABILITIES)}) or say how to score them (objective.reward: {{scorer: ..., "
                              "references: FIELD}})")
    elif ":" not in how.scorer:
        missing = next((i for i, r in enumerate(records) if how.references not in r), None)
        if missing is not None:
            raise ConfigError(f"stage {stage!r}: objective.reward.references = {how.references!r}, and record "
                              f"{missing + 1} of the stage has no such field (it has: {', '.join(records[missing])})")


def reward(record: dict, completion: str, how: Reward | None = None) -> float:
    """The score of ``completion``: by ``how`` (:class:`~mixtune.strategy.objectives.Reward`), else by
    the record's built-in ability (1 right, 0 wrong). Built-in scorers never raise; a user's
    function that raises stops the stage, naming it."""
    if how is None:
        return float(ABILITIES.get(record["ability"]).score(completion, record))
    if ":" in how.scorer:
        try:
            return float(user_scorer(how.scorer)(completion, record))
        except Exception as e:
            raise DataError(f"objective.reward.scorer {how.scorer} raised {type(e).__name__}: {e}") from None
    refs = record[how.references]
    refs = [str(r) for r in refs] if isinstance(refs, list) else [str(refs)]
    return float(SCORERS.get(how.scorer)(completion, refs, how.scorer_options))


def prompt_of(record: dict, tokenizer) -> str:
    """The rendered prompt of a record: every turn before its last assistant turn, and the generation prompt."""
    return prompt_text(record["messages"], tokenizer)


def budget(records: Sequence[dict], tokenizer, sampling: Sampling) -> int:
    """Tokens a completion may take: ``sampling.max_new_tokens``, else evaluation's budget for these records."""
    from mixtune.models.generate import max_tokens_for

    return sampling.max_new_tokens or max_tokens_for(list(records), tokenizer)


@dataclass(frozen=True)
class Rollouts:
    """``samples`` completions of each prompt, laid out prompt by prompt (prompt 0's, then prompt 1's ...)."""

    prompt_ids: list[list[int]]
    """Per completion, its prompt's token ids."""
    completion_ids: list[list[int]]
    """Per completion, the generated ids (through EOS)."""
    texts: list[str]
    rewards: torch.Tensor
    """``(n_prompts * samples,)`` float64."""
    prompt_index: list[int]
    """Per completion, the position of its prompt in the records given."""


def rollout(model, tokenizer, records: Sequence[dict], *, samples: int, sampling: Sampling, seed: int,
            max_new_tokens: int, how: Reward | None = None) -> Rollouts:
    """Sample ``samples`` completions of each record's prompt from ``model`` and score them.

    The model is left in training mode (generation puts it in eval mode)."""
    from mixtune.models.generate import sample

    prompts = [prompt_of(r, tokenizer) for r in records]
    was_training = model.training
    got = sample(model, tokenizer, prompts, num_samples=samples, temperature=sampling.temperature,
                 top_k=sampling.top_k, top_p=sampling.top_p, seed=seed, max_new_tokens=max_new_tokens,
                 batch_size=sampling.batch_size, return_ids=True)
    model.train(was_training)
    prompt_tokens = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    p_ids, c_ids, texts, rewards, index = [], [], [], [], []
    for i, (record, completions) in enumerate(zip(records, got)):
        for text, ids in completions:
            p_ids.append(prompt_tokens[i])
            c_ids.append(ids)
            texts.append(text)
            rewards.append(reward(record, text, how))
            index.append(i)
    return Rollouts(p_ids, c_ids, texts, torch.tensor(rewards, dtype=torch.float64), index)


def pad_examples(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Examples as right-padded ``input_ids``, ``labels`` (-100 on padding) and ``position_ids``, each ``(B, L)``."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    for b, e in enumerate(examples):
        ids[b, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[b, :len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(length).expand(len(examples), -1).contiguous()}


def completion_batch(prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]],
                     pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt + completion rows, right-padded (:func:`pad_examples`), the completion's ids the labels."""
    return pad_examples([Example(list(p) + list(c), [IGNORE] * len(p) + list(c))
                         for p, c in zip(prompt_ids, completion_ids)], pad_id)


__all__ = ["Rollouts", "budget", "check_rewardable", "completion_batch", "pad_examples", "prompt_of", "reward", "rollout"]
