"""Token losses for packed rows, and their sums per source."""

from __future__ import annotations

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
