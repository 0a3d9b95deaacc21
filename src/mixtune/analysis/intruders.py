"""Intruder dimensions: singular vectors that fine-tuning adds to a weight matrix, nearly
orthogonal to every pre-trained one (Shuttleworth et al., 2024, "LoRA vs Full Fine-tuning: An
Illusion of Equivalence", arXiv:2410.21228, Sec. 4, and the official
``find_intruder_dimensions.py``; mitigation as peft's ``reduce_intruder_dimension``).

Detection, for a pre-trained matrix W0 and its fine-tuned W (HF layout ``[out, in]``, in fp32):
``W0 = U0 S0 V0^T``, ``W = U S V^T``; for each of the top ``k`` left singular vectors u_j of W
(sorted by singular value), m_j = max_i |u_j . u0_i| over *all* pre-trained left singular
vectors; u_j is an intruder when m_j < eps. Defaults k = 10, eps = 0.5 (the official script's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Intruders:
    """The intruder analysis of one matrix."""

    max_cosine: torch.Tensor
    """(k,) m_j: the largest |cosine| of W's j-th singular vector with any pre-trained one."""
    singular_values: torch.Tensor
    """(k,) sigma_j of the fine-tuned matrix, descending."""
    eps: float

    @property
    def indices(self) -> list[int]:
        """Positions j < k (by singular value) of the intruders at ``eps``."""
        return torch.nonzero(self.max_cosine < self.eps).flatten().tolist()

    def count(self, eps: float | None = None) -> int:
        """The number of intruders at ``eps`` (default: the one it was computed with): a sweep over
        eps reuses one decomposition."""
        return int((self.max_cosine < (self.eps if eps is None else eps)).sum())


def _svd(w: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(w.detach().to(torch.float32), full_matrices=False)
    return (u, s, vh) if side == "left" else (vh.T, s, u.T)


def intruder_dimensions(w0: torch.Tensor, w: torch.Tensor, *, k: int = 10, eps: float = 0.5,
                        side: str = "left") -> Intruders:
    """The top-``k`` singular vectors of ``w`` and how close each comes to a singular vector of
    ``w0`` (Shuttleworth et al., 2024, Sec. 4: max_i |cos(y_j, x_i)| < eps); ``side`` ``right``
    compares right singular vectors instead (the paper's default, and ours, is left).

    Raises:
        ValueError: the matrices differ in shape, are not 2-D, or ``side`` is unknown.
    """
    if w0.shape != w.shape or w0.dim() != 2:
        raise ValueError(f"intruder dimensions compare two 2-D matrices of one shape, got {tuple(w0.shape)} and "
                         f"{tuple(w.shape)}")
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    u0, _, _ = _svd(w0, side)
    u, s, _ = _svd(w, side)
    k = min(k, s.numel())
    cos = (u[:, :k].T @ u0).abs().max(dim=1).values
    return Intruders(cos, s[:k], eps)


def mitigate_intruders(w0: torch.Tensor, w: torch.Tensor, *, k: int = 10, eps: float = 0.5,
                       lam: float = 0.75) -> torch.Tensor:
    """``w`` with its intruders' singular values scaled by ``lam``:
    W' = W + (lam - 1) sum_{j in I} sigma_j u_j v_j^T, I the intruders of (w0, w) at (k, eps)
    (Shuttleworth et al., 2024, Sec. 6; peft's ``reduce_intruder_dimension``, ``mitigation_lambda``
    default 0.75, which detects on the merged weight W0 + dW as here). Works on any fine-tuned
    matrix, not only a LoRA merge; returned in ``w``'s dtype."""
    found = intruder_dimensions(w0, w, k=k, eps=eps).indices
    if not found:
        return w.clone()
    u, s, vh = torch.linalg.svd(w.detach().to(torch.float32), full_matrices=False)
    part = (u[:, found] * s[found]) @ vh[found]
    return (w.to(torch.float32) + (lam - 1) * part).to(w.dtype)
