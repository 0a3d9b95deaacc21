"""Token losses for packed rows, their sums per source, the weights that turn them into a
batch loss (MFTCoder's cases, C-RLFT rewards) and Masked Thought's input corruption."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE = -100


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position (0 where the label is ignored).

    Args:
        logits: ``(B, L, V)`` model outputs.
        labels: ``(B, L)`` token ids, -100 where no loss is taken.

    Returns:
        ``(B, L - 1)``: the loss of predicting ``labels[:, t + 1]`` from position ``t``.
    """
    shifted = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE,
                         reduction="none")
    return ce.view_as(shifted)  # (B, L-1)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label token (the policy term of preference and RL losses).

    Returns:
        ``(logps, mask)``, each ``(B, L - 1)``: log p(``labels[:, t + 1]`` | position ``t``) in at
        least float32, 0 where the label is ignored, and the mask of the scored positions.
    """
    target = labels[:, 1:]
    mask = target != IGNORE
    x = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    picked = x.gather(-1, torch.where(mask, target, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked - torch.logsumexp(x, dim=-1), 0.0), mask


def per_source(values: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor, n_sources: int) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Sum of ``values`` and count of trained tokens per source, for the shifted positions.

    Args:
        values: ``(B, L - 1)`` per-token losses from :func:`token_losses`.
        labels, sources: ``(B, L)``; a token's source is that of the label it predicts.

    Returns:
        ``(sums, counts)``, each ``(n_sources,)`` float64.
    """
    mask = labels[:, 1:] != IGNORE
    src = sources[:, 1:][mask]
    sums = torch.zeros(n_sources, dtype=torch.float64).index_add_(0, src, values[mask].double())
    counts = torch.bincount(src, minlength=n_sources).double()
    return sums, counts


LossMode = Literal["case1", "case2", "case3", "case4"]


def token_weights(labels: torch.Tensor, sources: torch.Tensor, examples: torch.Tensor, mode: LossMode = "case1",
                  task_weights: torch.Tensor | None = None, rewards: torch.Tensor | None = None) -> torch.Tensor:
    """Each trained token's weight in the loss of one global batch, so that the loss is
    ``(token_losses * weights).sum()`` (the weights sum to 1).

    MFTCoder's losses (Liu et al., 2024, arXiv:2311.02303, Sec. 3.3; ``loss_func_mft``), with
    T_b the trained tokens of example b and w_tau a task's weight (``task_weights``, 1 by default):

    - ``case1``: the token mean over the batch, sum l / sum T (the default);
    - ``case2``: the mean over examples of each example's token mean;
    - ``case3``: per task (source) present in the batch, its token mean, then their w-weighted
      mean: sum_tau w_tau (sum_{b in tau} sum l / sum_{b in tau} T_b) / sum_tau w_tau;
    - ``case4``: per task, the mean of its examples' token means, then the w-weighted mean.

    ``rewards`` (one per source) weight each token within those means, as OpenChat's C-RLFT
    does (Wang et al., 2024, arXiv:2309.11235, Sec. 3.2: sum r_t l_t / sum r_t with ``case1``).

    Args:
        labels, sources, examples: ``(B, L)``; a token belongs to the source and example of the
            label it predicts.
        task_weights, rewards: ``(n_sources,)`` or None.

    Returns:
        ``(B, L - 1)`` float64 weights, 0 on untrained positions.
    """
    trained = labels[:, 1:] != IGNORE
    src, ex = sources[:, 1:].clamp(min=0), examples[:, 1:].clamp(min=0)
    r = trained.double()
    if rewards is not None:
        r = r * rewards.double()[src]
    if not trained.any():
        return r
    n_src = int(src.max()) + 1 if task_weights is None else task_weights.numel()
    n_ex = int(ex.max()) + 1

    def share(groups: torch.Tensor, n: int) -> torch.Tensor:  # each token's r over its group's total r
        total = torch.zeros(n, dtype=torch.float64).index_add_(0, groups[trained], r[trained])
        return torch.where(trained, r / total[groups].clamp(min=1e-300), torch.zeros_like(r))

    if mode == "case1":
        return r / r.sum()
    if mode == "case2":
        present = torch.unique(ex[trained])
        return share(ex, n_ex) / present.numel()
    tw = torch.ones(n_src, dtype=torch.float64) if task_weights is None else task_weights.double()
    tasks = torch.unique(src[trained])
    norm = tw[tasks].sum()
    if mode == "case3":
        return share(src, n_src) * tw[src] / norm
    # case4: within each task, its examples' token means averaged
    per_task_examples = torch.zeros(n_src, dtype=torch.float64)
    for t in tasks:
        per_task_examples[t] = torch.unique(ex[trained & (src == t)]).numel()
    return share(ex, n_ex) / per_task_examples[src].clamp(min=1) * tw[src] / norm


def masked_thought_rate(step: int, total_steps: int, rate: float, warmup: float = 0.66) -> float:
    """Masked Thought's corruption rate at optimizer ``step`` (Chen et al., 2024, arXiv:2403.02178,
    Sec. 3; official ``compute_loss``): min(p, p * step / (warmup * total + 1)), a linear ramp over
    the first ``warmup`` of training."""
    return min(rate, rate * step / (warmup * total_steps + 1))


def mask_thought(input_ids: torch.Tensor, labels: torch.Tensor, rate: float, generator: torch.Generator, *,
                 vocab_size: int, mask_id: int | None = None) -> torch.Tensor:
    """Masked Thought (Chen et al., 2024, arXiv:2403.02178, Sec. 3): each response token of the
    *input* (a position whose label is trained) is replaced, with probability ``rate``, by
    ``mask_id`` or, when None, a uniformly random token (the official GSM8K setting); prompt
    tokens are never touched and the labels stay the original tokens."""
    response = labels != IGNORE
    hit = response & (torch.rand(input_ids.shape, generator=generator) < rate)
    if mask_id is not None:
        replacement = torch.full_like(input_ids, mask_id)
    else:
        replacement = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    return torch.where(hit, replacement, input_ids)
