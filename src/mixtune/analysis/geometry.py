"""Task-vector geometry: how the updates of several fine-tuned runs relate, which predicts whether
merging them interferes (Ilharco et al., 2023, arXiv:2212.04089, Sec. 5, cosine similarity of task
vectors; Yadav et al., 2023, "TIES-Merging", arXiv:2306.01708, Sec. 3 and Fig. 3, sign conflicts
after trimming).

A task vector is tau = theta_ft - theta_0, here a dict of tensors by parameter name (or one flat
tensor). Whole-model quantities treat the dict as one vector over all its entries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from mixtune.core.names import layer_index
from mixtune.merge.methods import trim_mask

TaskVector = Mapping[str, torch.Tensor] | torch.Tensor


def _flat(tau: TaskVector) -> torch.Tensor:
    if isinstance(tau, torch.Tensor):
        return tau.detach().flatten().to(torch.float64)
    return torch.cat([tau[k].detach().flatten().to(torch.float64) for k in sorted(tau)])


def cosine(a: TaskVector, b: TaskVector) -> float:
    """cos(tau_a, tau_b) = <tau_a, tau_b> / (|tau_a| |tau_b|) over every entry (Ilharco et al., 2023,
    Sec. 5); 0 when either is zero. Dicts must hold the same names and shapes.

    Raises:
        ValueError: the two task vectors do not cover the same parameters.
    """
    if not isinstance(a, torch.Tensor) and sorted(a) != sorted(b):
        raise ValueError(f"task vectors over different parameters: {sorted(set(a) ^ set(b))[:5]}")
    x, y = _flat(a), _flat(b)
    if x.shape != y.shape:
        raise ValueError(f"task vectors of {x.numel()} and {y.numel()} entries")
    den = float(x.norm() * y.norm())
    return float(x @ y) / den if den > 0 else 0.0


def trimmed(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim of one flat vector (:func:`mixtune.merge.methods.trim_mask` over the whole vector:
    the entries at or above the (n - k)-th smallest magnitude, k = int(density n)); the others 0."""
    return torch.where(trim_mask(tau[None], density, "per_tensor")[0], tau, torch.zeros_like(tau))


def sign_conflicts(taus: Sequence[TaskVector], *, density: float = 0.2) -> float:
    """The TIES sign-conflict rate: after trimming each task vector to its top ``density`` entries
    by magnitude over the whole model (Yadav et al., 2023, Sec. 3, "Trim"; 0.2 as in the paper), the
    share of the entries where at least two trimmed vectors are non-zero whose non-zero signs
    disagree (the interference of Fig. 3). 0 when no entry is kept by two."""
    signs = torch.stack([torch.sign(trimmed(_flat(t), density)) for t in taus])
    nonzero = signs != 0
    shared = nonzero.sum(0) >= 2
    if not bool(shared.any()):
        return 0.0
    pos, neg = (signs > 0).any(0), (signs < 0).any(0)
    return float((pos & neg & shared).sum()) / float(shared.sum())


def topk_jaccard(a: TaskVector, b: TaskVector, *, density: float = 0.2) -> float:
    """|A & B| / |A | B| of the two trimmed masks (the top ``density`` entries by magnitude of each,
    as :func:`trimmed`): how far two updates touch the same weights. 1 when both masks are empty."""
    ma, mb = trimmed(_flat(a), density) != 0, trimmed(_flat(b), density) != 0
    union = int((ma | mb).sum())
    return int((ma & mb).sum()) / union if union else 1.0


def layer_norms(tau: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The L2 norm of the task vector per block (``"0"``, ``"1"``, ...: the block index in the
    parameter's name, :func:`mixtune.core.names.layer_index`) and of what lies outside the blocks
    (``"other"``: embeddings, final norm, head): sqrt of the summed squares of its tensors."""
    sums: dict[str, float] = {}
    for name, t in tau.items():
        i = layer_index(name)
        key = "other" if i is None else str(i)
        sums[key] = sums.get(key, 0.0) + float(t.detach().to(torch.float64).pow(2).sum())
    order = sorted((k for k in sums if k != "other"), key=int) + (["other"] if "other" in sums else [])
    return {k: math.sqrt(sums[k]) for k in order}
