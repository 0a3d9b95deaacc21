"""GRPO's pieces (Shao et al., 2024, DeepSeekMath, arXiv:2402.03300, Sec. 4.1): group-relative
advantages from outcome rewards, the clipped ratio surrogate, the k3 KL estimate to the reference
model, and the loss that combines them under the aggregation conventions in use.

Shapes: ``G`` completions per prompt, laid out consecutively (prompt 0's G, then prompt 1's, ...);
``B`` = n_prompts * G rows; per-token tensors are ``(B, T)`` over the completion tokens only, with
``mask`` 1 on the tokens that are trained (0 on padding and, where used, tool output).

Read against TRL at commit f2cd57710ae3 (version 1.10.0.dev0, 2026-07-24) and checked equal to TRL
1.16.0 to 1e-6 on the same log-probabilities by ``tests/train/test_trl_parity.py``:
``trl/trainer/grpo_trainer.py`` (the advantages in ``_generate_and_score_completions``,
``_compute_loss``) and ``trl/trainer/utils.py`` (``nanstd``). Where TRL's conventions differ from
ours, each function says so.
"""

from __future__ import annotations

from typing import Literal

import torch

from mixtune.core import ConfigError


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Outcome-supervision advantages (DeepSeekMath, Sec. 4.1.2): each completion's reward minus
    its group's mean, divided by the group's standard deviation plus ``eps``:
    A_i = (r_i - mean(r_group)) / (std(r_group) + eps), given to every token of completion i.

    The std is the **unbiased** (Bessel-corrected, divide by G - 1) one, as TRL's ``nanstd``; the
    paper does not say which. A group whose rewards are all equal gets advantages 0. NaN rewards
    (unscorable completions) are left out of their group's mean and std and get advantage 0, as
    in TRL. ``scale=False`` keeps only the mean baseline (Dr. GRPO; TRL ``scale_rewards="none"``);
    TRL's third option, ``"batch"`` (std over the whole batch), is not offered.

    Args:
        rewards: ``(n_prompts * group_size,)``, each prompt's group consecutive.
        group_size: G, completions per prompt.
        scale: divide by the group std.
        eps: added to the std (TRL's 1e-4).

    Returns:
        ``(n_prompts * group_size,)`` float advantages (at least float32).
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ConfigError(f"{rewards.numel()} rewards do not split into groups of group_size = {group_size}; "
                          "pass G completions for every prompt")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).reshape(-1, group_size)  # (P, G)
    adv = r - torch.nanmean(r, dim=1, keepdim=True)
    if scale:
        if group_size > 1:
            n = (~r.isnan()).sum(1, keepdim=True)
            # Bessel's correction; a group with one scored reward gets a NaN std, hence advantage 0
            std = (torch.nanmean(adv ** 2, dim=1, keepdim=True) * n / (n - 1)).sqrt()  # (P, 1)
        else:  # one completion per prompt: nothing to compare with, advantage 0 as in TRL
            std = torch.zeros_like(adv)
        adv = adv / (std + eps)
    return torch.nan_to_num(adv, nan=0.0).reshape(rewards.shape)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                      epsilon: float = 0.2, epsilon_high: float | None = None) -> torch.Tensor:
    """Per-token clipped ratio objective (to maximise) of DeepSeekMath Eq. 3 (PPO's, Schulman et
    al., 2017, arXiv:1707.06347, Eq. 7): with rho = pi(o_t) / pi_old(o_t),
    min(rho A, clip(rho, 1 - eps, 1 + eps_high) A).

    So a token with rho = 1.5 and eps = 0.2 contributes 1.2 A when A > 0 (the gain is capped) and
    1.5 A when A < 0 (the loss is not). ``epsilon_high`` (default ``epsilon``) is DAPO's
    clip-higher (Yu et al., 2025, arXiv:2503.14476), TRL's ``epsilon_high``. TRL's two-sided
    ``delta`` clip is not offered.

    Args:
        logp, old_logp: ``(B, T)`` token log-probabilities under the policy being trained and
            the policy that sampled (``logp.detach()`` when each batch is used once).
        advantages: ``(B,)`` one per completion (:func:`group_advantages`) or ``(B, T)``.
        mask: ``(B, T)`` bool or 0/1, the trained tokens.

    Returns:
        ``(B, T)`` objective, 0 where ``mask`` is 0.
    """
    a = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    ratio = torch.exp(logp - old_logp)
    hi = epsilon if epsilon_high is None else epsilon_high
    obj = torch.minimum(ratio * a, ratio.clamp(1 - epsilon, 1 + hi) * a)
    return torch.where(mask.bool(), obj, 0.0)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate of DeepSeekMath Eq. 4, Schulman's k3 ("Approximating KL
    divergence", 2020): with d = log ref(o_t) - log pi(o_t), exp(d) - d - 1.

    Unbiased for KL(pi || ref) under samples from pi, and >= 0 everywhere (0 iff d = 0).
    Elementwise; the mask is applied by the caller (:func:`grpo_loss`).
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


Aggregation = Literal["sequence", "token", "constant"]


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, *, epsilon: float = 0.2, beta: float = 0.04, aggregation: Aggregation = "sequence",
              epsilon_high: float | None = None, num_tokens: float | torch.Tensor | None = None,
              max_length: int | None = None) -> torch.Tensor:
    """GRPO loss, the negative of DeepSeekMath Eq. 3: each trained token's
    l_t = -(clipped surrogate) + beta * KL_k3 (:func:`clipped_surrogate`, :func:`kl_k3`),
    aggregated over the batch by one of (TRL's ``loss_type`` in brackets):

    - ``"sequence"`` (``"grpo"``): the paper's 1/G sum_i 1/|o_i| sum_t l_{i,t}: each completion's
      token mean, then the mean over completions. Short completions weigh more per token.
    - ``"token"``: sum of l over all trained tokens / their number. With ``num_tokens=None`` the
      count is this batch's (TRL ``"bnpo"``); pass ``num_tokens`` to normalise by a larger batch
      (TRL ``"dapo"``, its default, passes the trained tokens of the whole generation batch across
      processes, divided by the process count, since DDP averages gradients over processes).
    - ``"constant"`` (``"dr_grpo"``, Liu et al., 2025, arXiv:2503.20783): sum of l / (B *
      ``max_length``), the maximum completion length, so no length enters the normaliser.

    TRL further divides ``"grpo"``, ``"bnpo"`` and ``"dr_grpo"`` by the gradient-accumulation
    steps; that belongs to the loop, not here. TRL's defaults are ``beta=0`` and ``"dapo"``; ours
    are the paper's beta 0.04 and per-sequence mean.

    Args:
        logp, old_logp: ``(B, T)`` token log-probabilities (policy, sampling policy).
        ref_logp: ``(B, T)`` under the frozen reference; may be None when ``beta == 0``.
        advantages: ``(B,)`` or ``(B, T)``.
        mask: ``(B, T)`` bool or 0/1.
        epsilon, epsilon_high: the clip range, as in :func:`clipped_surrogate`.
        beta: the KL coefficient (>= 0; 0 skips the reference).
        num_tokens: the ``"token"`` normaliser, when not this batch's token count.
        max_length: the ``"constant"`` normaliser's length (required there).

    Returns:
        Scalar loss.
    """
    per_token = -clipped_surrogate(logp, old_logp, advantages, mask, epsilon=epsilon, epsilon_high=epsilon_high)
    if beta < 0:
        raise ConfigError(f"beta = {beta} must be >= 0 (the KL coefficient)")
    if beta > 0:
        if ref_logp is None:
            raise ConfigError(f"beta = {beta} needs the reference log-probabilities; pass ref_logp or set beta = 0")
        per_token = per_token + beta * kl_k3(logp, ref_logp)
    m = mask.to(per_token.dtype)
    per_token = per_token * m  # (B, T); the KL term is masked here
    if aggregation == "sequence":
        return (per_token.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if aggregation == "token":
        count = m.sum().clamp(min=1) if num_tokens is None else num_tokens
        return per_token.sum() / count
    if aggregation == "constant":
        if max_length is None:
            raise ConfigError('aggregation = "constant" needs max_length (the maximum completion length)')
        return per_token.sum() / (per_token.shape[0] * max_length)
    raise ConfigError(f"aggregation = {aggregation!r} is not one of 'sequence', 'token', 'constant'")
