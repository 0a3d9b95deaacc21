"""mergekit 0.1.5's methods that choose, entry by entry, what each task vector contributes:
``sce``, ``nearswap``, ``arcee_fusion``, ``ram`` and ``ramplus_tl``.

As in :mod:`mixtune.merge.compat`, each function gets the inputs already cast to the compute dtype D
(the config's ``dtype``, else the stored dtypes promoted; mergekit/merge_methods/base.py:455-458)
and takes mergekit's operations in mergekit's order, so that the tensors agree bit for bit. The
sums over a whole tensor (SCE's mean squares, the RAM counts) are taken over the whole tensor, as
mergekit takes them. ``arcee_fusion`` and ``ramplus_tl`` multiply by float32 tensors, so for half
precision inputs they return float32 as mergekit's do (mergekit then writes float32 unless
``out_dtype`` is set; mixtune writes ``out_dtype``, else ``dtype``).

Notation: theta_0 the base, theta_i the models, tau_i = theta_i - theta_0, k models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from mixtune.core import Strict
from mixtune.merge.compat import NoParams
from mixtune.merge.context import Context
from mixtune.merge.methods import register

# -- sce -----------------------------------------------------------------------------------------


class SceParams(Strict):
    select_topk: float = Field(default=1.0, ge=0, le=1)
    """Kept fraction of the entries that vary across the task vectors, the largest variances
    (the paper's tau); 1 (mergekit's default) keeps every entry."""
    int8_mask: bool = False
    """Accepted for compatibility; it changes mergekit's memory use, not its results."""


def variance_keep(taus: torch.Tensor, fraction: float) -> torch.Tensor:
    """SCE's "select" step as mergekit 0.1.5 takes it (mergekit/merge_methods/sce.py:58-76): the
    mask of the int(c * fraction) entries whose variance over the task vectors (population, in
    their dtype) is largest, c being the count of entries of non-zero variance, chosen by torch's
    topk as mergekit chooses them. ``taus``: (k, *shape); the mask has shape ``taus[0]``."""
    if fraction <= 0:
        return torch.zeros(taus.shape[1:], dtype=torch.bool)
    var = torch.var(taus, dim=0, correction=0)
    count = int(torch.count_nonzero(var) * fraction)  # a float32 product, truncated, as mergekit's
    keep = torch.zeros(var.numel(), dtype=torch.bool)
    if count:
        keep[torch.topk(var.abs().reshape(-1), k=count, largest=True).indices] = True
    return keep.reshape(var.shape)


@register("sce", SceParams, mergekit=True, weighted=False)
def sce(base, models, weights, p: SceParams, ctx: Context):
    """SCE, select-calculate-erase (Wan et al., 2024, "FuseChat: Knowledge Fusion of Chat Models",
    arXiv:2408.07990) as mergekit 0.1.5 runs it (mergekit/merge_methods/sce.py:21-55), per
    tensor in the inputs' dtype: 1) select: with ``select_topk`` < 1 only the entries of largest
    variance across the tau_i are kept (in every tau_i); 2) calculate: each model's weight
    a_i = mean(tau_i^2) / sum_j mean(tau_j^2) (1/k when that sum is below 1e-6); 3) erase: entries
    whose sign differs from sign(sum_i tau_i) (0 counts as +) are dropped; the result is
    theta_0 + sum_i a_i m_i tau_i / max(sum_i a_i m_i, 1e-6). Weights are not used."""
    k = len(models)
    taus = torch.stack([m - base for m in models])  # (k, *shape)
    # 1) select
    if p.select_topk < 1:
        taus = taus * variance_keep(taus, p.select_topk)
    # 2) calculate: the mean square of each whole task vector, normalised over the models
    a = taus.square().reshape(k, -1).mean(dim=1)  # (k,)
    total = float(a.sum())
    a = torch.ones_like(a) / k if abs(total) < 1e-6 else a / total
    a = a.reshape(k, *[1] * (taus.dim() - 1))
    # 3) erase: keep the entries agreeing with the sign of the sum (an entry of 0 agrees with neither)
    agree = torch.where(taus.sum(dim=0) >= 0, taus > 0, taus < 0)
    kept = a * agree
    return base + (taus * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)


# -- nearswap ------------------------------------------------------------------------------------


class NearswapParams(Strict):
    t: float
    """Distance up to which the model's value replaces the base's: the model's share of an entry is
    min(1, t / |theta_0 - theta_1|) (mergekit's ``t``, required; its example 0.0001)."""


@register("nearswap", NearswapParams, mergekit=True, n_models=(1, 1), weighted=False)
def nearswap(base, models, weights, p: NearswapParams, ctx: Context):
    """NearSwap (alchemonaut, 2024, model card of QuartetAnemoi-70B-t0.0001 on Hugging Face) as
    mergekit 0.1.5 runs it (Goddard et al., 2024, arXiv:2403.13257;
    mergekit/merge_methods/nearswap.py:23-31), entrywise in the inputs' dtype: s = clamp(t /
    max(|theta_0 - theta_1|, 1e-6), 0, 1), the result s theta_1 + (1 - s) theta_0: entries
    already within t of the base take the model's value, farther ones stay nearer the base."""
    a, b = base, models[0]
    share = (p.t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return share * b + (1 - share) * a


# -- arcee_fusion --------------------------------------------------------------------------------

QUANTILE_SAMPLE = 1_000_000
"""Entries above which mergekit estimates arcee_fusion's quartiles from this many drawn with
replacement (mergekit/merge_methods/arcee_fusion.py:15)."""


def fusion_importance(theta1: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion's importance of each entry (mergekit/merge_methods/arcee_fusion.py:47-54):
    |theta_1 - theta_0| times KL(p || q) of each row's softmax (dim -1; the whole vector for a
    1-D tensor), p = softmax(theta_1) + 1e-8 and q = softmax(theta_0) + 1e-8, in their dtype."""
    p_ = F.softmax(theta1, dim=-1) + 1e-8
    q_ = F.softmax(theta0, dim=-1) + 1e-8
    kl = torch.sum(p_ * torch.log(p_ / q_), dim=-1, keepdim=True)
    return (theta1 - theta0).abs() * kl


def fusion_threshold(score: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """median + 1.5 (q3 - q1) of ``score`` (mergekit/merge_methods/arcee_fusion.py:19-40): the
    quantile q of n values is the value of ascending rank int(q (n - 1)) (0-based, q a float32);
    over 1M entries, of 1M drawn with replacement (by ``rng``: mergekit draws from torch's global
    generator, so only the statistics agree there)."""
    flat = score.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=rng)]
    ranks = (torch.tensor([0.25, 0.5, 0.75]) * (flat.numel() - 1)).long()
    q1, median, q3 = (flat.kthvalue(int(r) + 1).values for r in ranks)  # = the sorted values at those ranks
    return median + 1.5 * (q3 - q1)


@register("arcee_fusion", NoParams, mergekit=True, n_models=(1, 1), weighted=False)
def arcee_fusion(base, models, weights, p: NoParams, ctx: Context):
    """Arcee Fusion (Arcee AI, 2025, "Meet MergeKit v0.1: Arcee Fusion", arcee.ai blog) as mergekit
    0.1.5 runs it (Goddard et al., 2024, arXiv:2403.13257;
    mergekit/merge_methods/arcee_fusion.py:57-72): the model's change is taken where its
    importance, |tau| times the KL divergence of the row's softmax, KL(softmax(theta_1) ||
    softmax(theta_0)), reaches median + 1.5 IQR of the tensor's importances, and the base is kept
    elsewhere: theta_0 + tau * m, with m a float32 0/1 mask (so half precision inputs give
    float32, as in mergekit)."""
    theta0, theta1 = base, models[0]
    score = fusion_importance(theta1, theta0)
    keep = (score >= fusion_threshold(score, ctx.rng)).float()
    return theta0 + (theta1 - theta0) * keep


# -- ram, ramplus_tl -----------------------------------------------------------------------------


class RamParams(Strict):
    epsilon: float = Field(default=1e-5, ge=0)
    """An entry of a task vector counts as changed where |tau_i| > epsilon (mergekit's default 1e-5)."""


class RamPlusParams(Strict):
    r: float = 0.1
    """Strength of the rescaling of unique entries: lambda_i = 1 + r clip(rho_i, 0, alpha) (mergekit's
    default 0.1)."""
    alpha: float = 0.2
    """Upper bound of the shared-to-unique ratio rho_i in lambda_i (mergekit's default 0.2)."""
    epsilon: float = Field(default=1e-5, ge=0)
    """An entry of a task vector counts as changed where |tau_i| > epsilon (mergekit's default 1e-5)."""


def _ram_split(base: torch.Tensor, models: list[torch.Tensor], epsilon: float):
    """The flat task vectors with unchanged entries zeroed, the changed-entry masks, each entry's
    count of models changing it, and the masks of entries changed by one model and by several
    (mergekit/merge_methods/ram.py:157-182)."""
    taus = torch.stack([m - base for m in models]).view(len(models), -1)  # (k, n)
    changed = taus.abs() > epsilon
    count = changed.sum(dim=0, keepdim=True)  # (1, n), int64
    return taus * changed, changed, count, count == 1, count > 1


@register("ram", RamParams, mergekit=True, weighted=False)
def ram(base, models, weights, p: RamParams, ctx: Context):
    """Reinforced Agent Merging (Yuan et al., 2026, "Behavior Knowledge Merge in Reinforced Agentic
    Models", arXiv:2601.13572) as mergekit 0.1.5 runs it (mergekit/merge_methods/ram.py:86-115),
    per tensor in the inputs' dtype: an entry changed (|tau_i| > epsilon) by one model takes that
    model's change, one changed by several takes the mean of their changes, and an unchanged one
    stays the base's: theta_0 + sum_i tau_i c_i / max(1, sum_j c_j) with c_i the changed mask.
    Weights are not used."""
    kept, _changed, count, unique, shared = _ram_split(base, models, p.epsilon)
    merged = (kept * unique + kept * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


@register("ramplus_tl", RamPlusParams, mergekit=True, weighted=False)
def ramplus_tl(base, models, weights, p: RamPlusParams, ctx: Context):
    """RAM+ (Yuan et al., 2026, arXiv:2601.13572), tensor-local, as mergekit 0.1.5 runs it
    (mergekit/merge_methods/ram.py:118-154): as ``ram``, with each model's unique entries scaled by
    lambda_i = 1 + r clip(rho_i, 0, alpha), rho_i = (its entries shared with another model) /
    max(its unique entries, epsilon), counted within the tensor (the paper counts over the whole
    model). lambda is a float32 tensor, so half precision inputs give float32, as in mergekit.
    Weights are not used."""
    kept, changed, count, unique, shared = _ram_split(base, models, p.epsilon)
    n_shared = (changed & shared).sum(dim=1)  # (k,), int64
    n_unique = (changed & unique).sum(dim=1)
    rho = n_shared / n_unique.clamp(min=p.epsilon)  # float32, as mergekit's
    lam = 1 + p.r * rho.clamp(min=0, max=p.alpha)
    merged = (kept * unique * lam.unsqueeze(-1) + kept * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)
