"""Preference losses on per-sequence log-probabilities: DPO (with conservative-DPO label
smoothing), IPO and SimPO, and the helper that turns logits into those log-probabilities.

Every loss takes ``(batch,)`` tensors of log-probabilities of the chosen and rejected completions
and returns ``(losses, chosen_rewards, rejected_rewards)``, each ``(batch,)``: the per-pair loss
(the batch loss is its mean) and the implicit rewards, detached, for logging.

Read against TRL at commit f2cd57710ae3 (version 1.10.0.dev0, 2026-07-24) and checked equal to TRL
1.16.0 to 1e-6 on the same log-probabilities by ``tests/train/test_trl_parity.py``:
``trl/trainer/dpo_trainer.py`` (``DPOTrainer._compute_loss``; and ``v0.28.0`` ``dpo_loss`` for
label smoothing), ``trl/experimental/cpo/cpo_trainer.py`` (``cpo_loss``, ``get_batch_logps``).
Where TRL's conventions differ from ours, each function says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixtune.core import ConfigError
from mixtune.train.losses import IGNORE, token_logps


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE,
                   average: bool = False) -> torch.Tensor:
    """Summed (or mean) log-probability of each row's label tokens.

    Position ``t`` predicts ``labels[:, t + 1]`` (the usual one-position shift), so ``labels[:, 0]``
    is never scored. Computed in at least float32 whatever the logits' dtype.

    Args:
        logits: ``(B, L, V)`` model outputs.
        labels: ``(B, L)`` token ids, ``ignore_index`` where a token is not scored (prompt, padding).
        average: return the mean over the scored tokens instead of the sum (the input of
            :func:`ipo_loss` and :func:`simpo_loss`). A row with no scored token gives 0, where
            TRL's ``get_batch_logps`` divides by zero.

    Returns:
        ``(B,)`` log-probabilities.
    """
    if ignore_index != IGNORE:
        labels = labels.masked_fill(labels == ignore_index, IGNORE)
    token, scored = token_logps(logits, labels)  # (B, L-1)
    total = token.sum(-1)
    if average:
        return total / scored.sum(-1).clamp(min=1)
    return total


def _check(beta: float, label_smoothing: float = 0.0) -> None:
    if not beta > 0:
        raise ConfigError(f"beta = {beta} must be > 0")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing = {label_smoothing} must lie in [0, 0.5) (probability a preference "
                          "label is flipped)")


def _smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): the logistic loss when the preference label
    is flipped with probability eps (conservative DPO)."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al., 2023, arXiv:2305.18290, Eq. 7), with conservative-DPO label smoothing.

    With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), each pair's loss is
    -log sigmoid(beta h); with label smoothing eps (the chance the label is flipped, cDPO:
    Mitchell, 2023, "A note on DPO with noisy preferences"), it is
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h). The rewards are
    beta (log pi(y) - log ref(y)).

    TRL: equal to ``loss_type="sigmoid"`` at every version when eps = 0. With eps > 0 it equals
    TRL <= 0.28's ``"sigmoid"``; from 0.29 (the DPO refactor) TRL's ``"sigmoid"`` ignores
    ``label_smoothing`` and the smoothed form lives on as its ``"aot"`` and CPO ``"sigmoid"`` losses.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: ``(B,)`` summed log-probabilities
            of the completions (:func:`sequence_logps`), under the policy and the frozen reference.
        beta: the KL coefficient (> 0).
        label_smoothing: eps in [0, 0.5).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``.
    """
    _check(beta, label_smoothing)
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    losses = _smoothed_logistic(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al., 2023, arXiv:2310.12036, Eq. 17, with tau = ``beta``).

    Each pair's loss is (h - 1 / (2 beta))^2, h the same log-ratio difference as in
    :func:`dpo_loss`; the rewards are beta (log pi(y) - log ref(y)).

    Convention: the inputs are **per-token mean** log-probabilities
    (``sequence_logps(..., average=True)``), so h is a difference of mean log-ratios and the loss
    does not grow with completion length. This is TRL's convention at every version compared:
    ``v0.28`` divides policy and reference log-probs by the completion length before ``dpo_loss``;
    the current trainer divides each summed log-ratio by its completion's token count (the same
    number, the mask being shared), a normalisation TRL says the IPO authors confirmed. The one
    difference: TRL >= 0.29 logs rewards from the *summed* log-ratios, here they come from the
    means given. Pass summed log-probs for the paper's literal sequence-level form.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: ``(B,)`` mean log-probabilities.
        beta: the regularisation tau (> 0); the target margin is 1 / (2 beta).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``.
    """
    _check(beta)
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(policy_chosen_avg: torch.Tensor, policy_rejected_avg: torch.Tensor, *, beta: float = 2.0,
               gamma_beta_ratio: float = 0.5, label_smoothing: float = 0.0) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al., 2024, arXiv:2405.14734, Eq. 6): length-normalised, no reference model.

    With the mean token log-probabilities pi_w, pi_l of the chosen and rejected completions and
    the margin gamma = ``gamma_beta_ratio`` * beta, each pair's loss is
    -log sigmoid(beta (pi_w - pi_l) - gamma), label-smoothed as in :func:`dpo_loss` when eps > 0
    (the official SimPO trainer and TRL's CPO ``"simpo"`` both offer it). The rewards are beta pi.

    TRL (``CPOTrainer``, ``loss_type="simpo"``) takes the margin itself, ``simpo_gamma`` = gamma,
    not the ratio: TRL's ``simpo_gamma`` = ``gamma_beta_ratio * beta`` here. Defaults are the
    official repository's (beta 2.0, gamma/beta 0.5), not TRL's (beta 0.1, gamma 0.5).

    Args:
        policy_chosen_avg, policy_rejected_avg: ``(B,)`` mean token log-probabilities
            (``sequence_logps(..., average=True)``).
        beta: the reward scale (> 0).
        gamma_beta_ratio: gamma / beta, the target margin in mean log-probability.
        label_smoothing: eps in [0, 0.5).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``.
    """
    _check(beta, label_smoothing)
    z = beta * (policy_chosen_avg - policy_rejected_avg - gamma_beta_ratio)  # = beta (pi_w - pi_l) - gamma
    losses = _smoothed_logistic(z, label_smoothing)
    return losses, beta * policy_chosen_avg.detach(), beta * policy_rejected_avg.detach()
