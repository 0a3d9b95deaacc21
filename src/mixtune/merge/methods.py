"""Merge methods: one small pure function per method, on the tensors of one parameter.

Every function gets the base tensor (None for methods without a base), the models' tensors, their
weights, its validated parameters and a :class:`~mixtune.merge.context.Context` (the parameter's
name and block index, a seeded generator, the per-model parameters, whole-model statistics), and
returns the merged tensor.

Two families share the registry. This module holds the paper methods (``ties_paper``,
``dare_paper``, ``dare_ties_paper``, ``breadcrumbs_paper``, ``pcb``, ``lines``, ``compeft``,
``transfer``, ``graft``): they get the tensors as stored (bf16, say), compute in float32 and follow
each paper's official code, as summarised in shared/methods/merging.md. Where a selection needs a
top-k or quantile, ``scope`` says over what it is taken, the paper's code being the default:

- ``global``: every floating-point parameter of the model at once, per model (the TIES, PCB and
  ComPEFT code flatten the whole model this way); found by streaming passes before the merge;
- ``per_tensor``: the whole tensor, flattened;
- ``per_row``: each row along the last dimension (1-D tensors: the whole vector).

The mergekit names (``linear``, ``task_arithmetic``, ``ties``, ``slerp``, ``passthrough``, ...)
live in :mod:`mixtune.merge.compat`: they reproduce mergekit 0.1.5 operation for operation, in the
config's ``dtype``.
Notation: theta_0 the base, tau_i = theta_i - theta_0 the task vectors, d a kept fraction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from mixtune.core import ConfigError, Registry, Strict
from mixtune.merge.context import Context

Scope = Literal["global", "per_tensor", "per_row"]


class NoModelParams(Strict):
    """Methods whose models take only a weight."""


@dataclass(frozen=True)
class MergeMethod:
    fn: Callable
    params: type[Strict]
    needs_base: bool
    model_params: type[Strict] = NoModelParams
    """Per-model parameters besides ``weight`` (mergekit's density, gamma)."""
    files_from: int = 0
    """Which input's config and tokenizer files the output takes (0: the base, or the first model
    for methods without one; i: the i-th model, 1-based)."""
    mergekit: bool = False
    """Computes as mergekit 0.1.5 does (:mod:`mixtune.merge.compat`): the inputs are cast to the
    config's ``dtype`` (default: their stored dtype, promoted) and the method's arithmetic runs in
    it; its parameters may vary by tensor (gradients, filters: :mod:`mixtune.merge.settings`).
    Otherwise the method gets the tensors as stored and computes in float32."""
    optional_base: bool = False
    """Uses a base when one is given, and merges the models alone otherwise (mergekit's nuslerp)."""
    n_models: tuple[int, int | None] = (1, None)
    """The fewest and the most models it merges besides the base (None: any number)."""
    weighted: bool = True
    """Takes a weight per model (slerp, model_stock and passthrough do not; giving one is an error)."""


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method", require_citation=True)


def register(name: str, params: type[Strict], needs_base: bool = True, model_params: type[Strict] = NoModelParams,
             **options):
    """Decorator registering a merge function under ``name`` (``options``: the other fields of
    :class:`MergeMethod`); its docstring, which must open with the citation, is its description."""
    def wrap(fn):
        MERGE_METHODS.add(name, MergeMethod(fn, params, needs_base, model_params, **options), doc=fn.__doc__)
        return fn
    return wrap


def units(x: torch.Tensor, scope: Scope) -> torch.Tensor:
    """Stacked ``x`` (models x parameter shape) as models x units x entries, a unit being what a
    selection ranks within: the row (``per_row``, tensors of 2+ dimensions) or the whole tensor."""
    if scope == "per_row" and x.dim() >= 3:
        return x.reshape(x.shape[0], -1, x.shape[-1])
    return x.reshape(x.shape[0], 1, -1)


def order_stats(values: torch.Tensor, ranks: Callable[[int], list[int]], scope: Scope, ctx: Context | None,
                name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``values`` as models x units x entries and, per model and unit, its k-th smallest entry for
    each k in ``ranks(n)`` (1-based; n = the unit's size: the whole model for ``global``)."""
    v = units(values, scope)
    if scope == "global":
        if ctx is None:
            raise ValueError("scope global needs the merge context's whole-model statistics")
        found = ctx.kth(name, v.reshape(v.shape[0], -1), ranks)
        return v, [found[:, j].reshape(-1, 1, 1) for j in range(found.shape[1])]
    n = v.shape[-1]
    out = []
    for k in ranks(n):
        if v.shape[1] == 1:  # one unit per model: selection without a full kthvalue
            out.append(torch.stack([kth_smallest(row[0], k) for row in v]).reshape(-1, 1, 1))
        else:
            out.append(v.kthvalue(k, dim=-1, keepdim=True).values)
    return v, out


def trim_mask(x: torch.Tensor, density: float, scope: Scope, ctx: Context | None = None,
              name: str = "trim") -> torch.Tensor:
    """Keep-mask of the largest magnitudes of each model's ``x[i]``, as TIES' ``topk_values_mask``
    (Yadav et al., 2023, arXiv:2306.01708, Sec. 3, "Trim"): with n entries per unit and
    k = int(density * n), the threshold is the (n - k)-th smallest |x| and every entry at or above
    it is kept (ties inclusive, so k + 1 entries survive when magnitudes are distinct, as in the
    official code). ``density >= 1`` keeps everything."""
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    if x[0].numel() == 0:
        return torch.ones_like(x, dtype=torch.bool)
    v, (kth,) = order_stats(x.abs(), lambda n: [max(1, n - int(density * n))], scope, ctx, name)
    return (v >= kth).reshape(x.shape)


def top_mask(x: torch.Tensor, density: float, scope: Scope, ctx: Context | None = None,
             name: str = "top") -> torch.Tensor:
    """Keep-mask of the top k = max(1, int(density * n)) magnitudes of each model's ``x[i]`` per
    unit of n entries, as the grafting basepatch (Panigrahi et al., 2023, arXiv:2302.06600,
    official ``create_basepatch``): every non-zero entry at or above the k-th largest |x|, so k
    entries when magnitudes are distinct (ties at the cut are all kept; the official code keeps
    those strictly above it, k - 1). Zero entries are never kept. ``density >= 1`` keeps every
    non-zero entry."""
    if density >= 1 or x[0].numel() == 0:
        return x != 0
    v, (kth,) = order_stats(x.abs(), lambda n: [max(1, n - max(1, int(density * n)) + 1)], scope, ctx, name)
    return ((v >= kth) & (v > 0)).reshape(x.shape)


def elect_sign(taus: torch.Tensor, scope: Scope = "per_tensor", ctx: Context | None = None) -> torch.Tensor:
    """TIES "Elect" (Yadav et al., 2023, arXiv:2306.01708, Sec. 3; ``resolve_sign`` "mass"):
    gamma = sign(sum_t tau_t); entries whose sum is 0 take the majority sign sign(sum gamma),
    taken over the whole model for ``global`` (as the official code) and over the tensor
    otherwise, and +1 if that is 0 too."""
    gamma = torch.sign(taus.sum(0))
    total = ctx.total("ties_majority", gamma.sum()) if scope == "global" else gamma.sum()
    majority = torch.sign(total).to(gamma.dtype)
    gamma[gamma == 0] = majority if majority != 0 else 1.0
    return gamma


def disjoint_mean(taus: torch.Tensor, gamma: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """TIES "Disjoint merge" (Yadav et al., 2023, arXiv:2306.01708, Sec. 3, ``dis-mean``): the mean
    of the entries whose sign agrees with gamma (strictly), 0 where none does. With weights w_t
    (``taus`` already scaled by them) it is sum_t w_t tau_t m_t / sum_t w_t m_t, which is the
    paper's count mean when every weight is 1."""
    agree = torch.where(gamma > 0, taus > 0, taus < 0)
    w = torch.ones(taus.shape[0]) if weights is None else weights
    divisor = (w.reshape(-1, *[1] * (taus.dim() - 1)) * agree).sum(0)
    return (taus * agree).sum(0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def dare_drop(tau: torch.Tensor, p: float, rng: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """DARE (Yu et al., 2024, arXiv:2311.03099, Sec. 3, Eq. 1-2): drop each entry with
    probability p, rescale the survivors by 1/(1 - p) (``mask_input_with_mask_rate``)."""
    if p <= 0:
        return tau
    keep = torch.rand(tau.shape, generator=rng) >= p
    out = tau * keep
    return out / (1 - p) if rescale and p < 1 else out


def breadcrumbs_mask(taus: torch.Tensor, density: float, gamma: float, scope: Scope,
                     ctx: Context | None = None) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, 2024, arXiv:2312.06795, Sec. 3;
    ``TaskVectorMiddleKeep``): per unit of n entries of each model's ``taus[i]``, remove the
    int(gamma * n) largest magnitudes, then keep the int(density * n) largest of what remains
    (magnitude ranks (gamma n, (gamma + density) n]). Within a tensor, equal magnitudes are ranked
    by position; over the whole model (``global``) the cut-offs are magnitudes and entries equal
    to either are kept. 0-d tensors are kept whole."""
    if taus.dim() == 1:
        return torch.ones_like(taus, dtype=torch.bool)
    a = taus.abs()
    if scope == "global":
        def ranks(n):  # the smallest and the largest kept magnitude
            top, keep = int(gamma * n), int(density * n)
            return [min(n, max(1, n - top - keep + 1)), max(1, n - top)]
        v, (lo, hi) = order_stats(a, ranks, scope, ctx, "breadcrumbs")
        return ((v >= lo) & (v <= hi)).reshape(taus.shape)
    v = units(a, scope)
    n = v.shape[-1]
    top, keep = int(gamma * n), int(density * n)
    order = v.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n).expand_as(order))
    return ((rank >= top) & (rank < top + keep)).reshape(taus.shape)


def _deltas(base: torch.Tensor, models: list[torch.Tensor], weights=None) -> tuple[torch.Tensor, torch.Tensor]:
    """base in float32 and the stacked (weighted) task vectors w_i (theta_i - theta_0)."""
    b = base.float()
    w = [1.0] * len(models) if weights is None else weights
    return b, torch.stack([wi * (m.float() - b) for wi, m in zip(w, models)])


class TiesParams(Strict):
    density: float = Field(default=0.2, gt=0, le=1)
    """Kept fraction of each task vector (paper: 20%)."""
    lambda_: float = Field(default=1.0, alias="lambda")
    """Scale of the merged task vector tau_m added to the base (paper: 1)."""
    scope: Scope = "global"
    """Where the top-k is taken (paper: the whole model)."""


@register("ties_paper", TiesParams)
def ties_paper(base, models, weights, p: TiesParams, ctx: Context):
    """TIES-Merging (Yadav et al., 2023, arXiv:2306.01708, Algorithm 1): trim each w_i tau_i to
    its top ``density`` magnitudes (over the whole model by default, as the official code), elect
    the sign of the sum, average the agreeing entries (weighted by w_i; the paper's count mean
    when all w_i = 1), theta_0 + lambda * tau_m."""
    base, taus = _deltas(base, models, weights)
    taus = taus * trim_mask(taus, p.density, p.scope, ctx)
    gamma = elect_sign(taus, p.scope, ctx)
    return base + p.lambda_ * disjoint_mean(taus, gamma, torch.tensor(weights, dtype=taus.dtype))


class DareParams(Strict):
    drop: float = Field(default=0.1, ge=0, lt=1)
    """Drop rate p (official default 0.1; README LLM example 0.2)."""
    rescale: bool = True
    """Rescale survivors by 1/(1 - p); false is the paper's DropOnly ablation."""
    merge: Literal["average", "task_arithmetic"] = "average"
    """What runs on the dropped task vectors: their mean (official default) or lambda * sum."""
    lambda_: float = Field(default=1.0, alias="lambda")
    """Scale of the summed task vectors with merge: task_arithmetic (unused by average)."""


@register("dare_paper", DareParams)
def dare_paper(base, models, weights, p: DareParams, ctx: Context):
    """DARE (Yu et al., 2024, arXiv:2311.03099, Sec. 3): drop-and-rescale every tau_i, then
    average merging, theta_0 + sum_i w_i tau~_i / sum_i w_i (default), or task arithmetic,
    theta_0 + lambda * sum_i w_i tau~_i."""
    base, models = base.float(), [m.float() for m in models]
    taus = [w * dare_drop(m - base, p.drop, ctx.rng, p.rescale) for w, m in zip(weights, models)]
    if p.merge == "average":
        return base + sum(taus) / sum(weights)
    return base + p.lambda_ * sum(taus)


class DareTiesParams(Strict):
    drop: float = Field(default=0.1, ge=0, lt=1)
    """Drop rate p of the DARE step; survivors are rescaled by 1/(1 - p) (official default 0.1)."""
    density: float = Field(default=0.2, gt=0, le=1)
    """TIES trim applied after the drop (official: keep 20%)."""
    lambda_: float = Field(default=1.0, alias="lambda")
    """Scale of the merged task vector added to the base (TIES' lambda; official: 1)."""
    scope: Scope = "global"
    """Where the TIES top-k is taken (official: the whole model)."""


@register("dare_ties_paper", DareTiesParams)
def dare_ties_paper(base, models, weights, p: DareTiesParams, ctx: Context):
    """DARE-TIES (Yu et al., 2024, arXiv:2311.03099, Sec. 4.1; MergeLM ``ties_merging`` after
    ``mask_model_weights``): drop-and-rescale each tau_i, then the full TIES merge."""
    base, models = base.float(), [m.float() for m in models]
    dropped = [base + dare_drop(m - base, p.drop, ctx.rng) for m in models]
    ties = TiesParams(density=p.density, scope=p.scope, **{"lambda": p.lambda_})
    return ties_paper(base, dropped, weights, ties, ctx)


class BreadcrumbsParams(Strict):
    density: float = Field(default=0.15, gt=0, le=1)
    """beta: kept fraction after the outliers go (code initial point 0.15)."""
    gamma: float = Field(default=0.006, ge=0, lt=1)
    """Largest-magnitude fraction removed (code initial point 0.006)."""
    lambda_: float = Field(default=0.2, alias="lambda")
    """alpha: scale of the summed breadcrumbs (code initial point 0.2)."""
    scope: Scope = "per_row"
    """Where the outliers and the kept fraction are ranked (official code: each row)."""


@register("breadcrumbs_paper", BreadcrumbsParams)
def breadcrumbs_paper(base, models, weights, p: BreadcrumbsParams, ctx: Context):
    """Model Breadcrumbs (Davari & Belilovsky, 2024, arXiv:2312.06795, Sec. 3): mask the top
    ``gamma`` outliers and keep the next ``density`` of each tau_i (per row in the official
    code), theta_0 + lambda * sum_i w_i tau~_i."""
    base, taus = _deltas(base, models, weights)
    return base + p.lambda_ * (taus * breadcrumbs_mask(taus, p.density, p.gamma, p.scope, ctx)).sum(0)


def _minmax(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(x - lo) / (hi - lo), 0 where hi == lo (the official code divides by zero there)."""
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


class PcbParams(Strict):
    ratio: float = Field(default=0.1, gt=0, le=1)
    """r: the kept fraction of each task vector by balanced score (``pcb_ratio``; grids 0.05-0.2)."""
    clip: float = Field(default=0.0001, ge=0, lt=0.5)
    """Magnitudes are clipped to their [clip, 1 - clip] quantiles first (NLP code: 0.01)."""
    lambda_: float = Field(default=1.0, alias="lambda")
    """Scale of the merged task vector added to the base (the paper tunes it on validation data)."""
    scope: Scope = "global"
    """Where the quantiles and the top-r are taken (official: the whole model)."""


@register("pcb", PcbParams)
def pcb(base, models, weights, p: PcbParams, ctx: Context):
    """PCB-Merging (Du et al., 2024, arXiv:2410.02396, Sec. 3; official ``PCB_merge``), on
    T_i = w_i tau_i with n models and N entries per unit (the whole model by default):

    A_i = clamp(|T_i|, a_lo, a_hi), a_lo/a_hi the (int(N c) + 1)-th / int(N (1 - c))-th smallest |T_i|;
    intra_i = exp(n * ((A_i - a_lo) / (a_hi - a_lo))^2);  inter_i = tanh(T_i * sum_j T_j);
    s_i = intra_i * inter_i;  scale_i = (clamp(s_i, s_lo, s_max) - s_lo) / (s_max - s_lo), s_lo the
    (int(N (1 - r)) + 1)-th smallest s_i;  tau_m = sum_i sign(T_i) A_i scale_i / max(sum_i scale_i, 1e-12);
    theta_0 + lambda * tau_m. The code's exp/tanh stand where the paper writes softmax."""
    base, t = _deltas(base, models, weights)
    n_models = t.shape[0]
    v, (a_lo, a_hi) = order_stats(t.abs(), lambda n: [min(n, int(n * p.clip) + 1), max(1, int(n * (1 - p.clip)))],
                                  p.scope, ctx, "pcb_clip")
    a = v.clamp(a_lo, a_hi)
    intra = torch.exp(n_models * _minmax(a, a_lo, a_hi) ** 2)
    inter = torch.tanh(t * t.sum(0, keepdim=True)).reshape(v.shape)
    score = intra * inter
    _, (s_lo, s_max) = order_stats(score.reshape(t.shape), lambda n: [min(n, int(n * (1 - p.ratio)) + 1), n],
                                   p.scope, ctx, "pcb_score")
    scale = _minmax(score.clamp(s_lo, s_max), s_lo, s_max)
    clipped = torch.sign(t).reshape(v.shape) * a
    merged = (clipped * scale).sum(0) / scale.sum(0).clamp(min=1e-12)
    return base + p.lambda_ * merged.reshape(base.shape)


class LinesParams(Strict):
    alpha: float | Literal["auto"] = 0.1
    """Scale of the first block and of every non-block parameter (embeddings, final norm, head).
    ``auto`` is the paper's multi-task rule alpha = (||sum_t tau_t||_1 / ||tau_MTL||_1) / T, with
    tau_MTL the merged multi-task vector and T the number of models; here tau_MTL = sum_t tau_t, so
    auto gives 1/T."""
    beta: float | None = None
    """Added scale at the last block; default 1 - alpha (the single-task rule: the last block keeps
    its whole update)."""
    lambda_: float = Field(default=1.0, alias="lambda")
    """Scale of the whole depth-scaled task vector, after s(l) (official: 1)."""


@register("lines", LinesParams)
def lines(base, models, weights, p: LinesParams, ctx: Context):
    """LiNeS (Wang et al., 2025, arXiv:2410.17146, Sec. 3; official ``LiNeS_scaling``): scale the
    summed task vector by depth, theta_0 + lambda * s(l) * sum_i w_i tau_i with
    s(l) = alpha + beta * l / (L - 1) for block l of L (0-based, read from the parameter name;
    L = 1 gives alpha + beta) and s = alpha for parameters outside the blocks, so shallow layers
    stay near the base and forget less."""
    base, taus = _deltas(base, models, weights)
    alpha = 1 / len(models) if p.alpha == "auto" else p.alpha
    beta = 1 - alpha if p.beta is None else p.beta
    if ctx.layer is None:
        s = alpha
    else:
        s = alpha + beta * (ctx.layer / (ctx.num_layers - 1) if ctx.num_layers > 1 else 1.0)
    return base + p.lambda_ * s * taus.sum(0)


class CompeftParams(Strict):
    density: float = Field(default=0.2, gt=0, le=1)
    """k: kept fraction of each task vector (official default 20%)."""
    alpha: float | None = Field(default=1.0, gt=0)
    """Kept entries become alpha * std(tau) * sign(tau) (``replace_factor``); null keeps their
    values (pruning only, the code's replace_factor -1)."""
    lambda_: float = Field(default=1.0, alias="lambda")
    """Scale of the summed compressed task vectors added to the base (1 is the official theta_0 + tau^)."""
    scope: Scope = "global"
    """Where the top-k and the standard deviation are taken (official: the whole model)."""


@register("compeft", CompeftParams)
def compeft(base, models, weights, p: CompeftParams, ctx: Context):
    """ComPEFT (Yadav et al., 2023, arXiv:2311.13171, Sec. 3; official ``compress_and_update_*``):
    compress each task vector to a ternary one, tau^_i = alpha * sigma_i * sign(tau_i) * m_i, with
    sigma_i the standard deviation of the dense tau_i (unbiased, over ``scope``) and m_i its TIES
    top-k mask (ties inclusive); theta_0 + lambda * sum_i w_i tau^_i. One model with weight 1 gives
    that model, compressed."""
    base, taus = _deltas(base, models)
    mask = trim_mask(taus, p.density, p.scope, ctx, "compeft_trim")
    if p.alpha is None:
        kept = taus * mask
    else:
        v = units(taus.double(), p.scope)
        moments = torch.stack([torch.full(v.shape[:2], v.shape[-1], dtype=torch.float64), v.sum(-1),
                               (v * v).sum(-1)], -1)  # models x units x (n, sum, sum of squares)
        if p.scope == "global":
            moments = ctx.total("compeft_moments", moments)
        n, s1, s2 = moments.unbind(-1)
        std = ((s2 - s1 * s1 / n) / (n - 1).clamp(min=1)).clamp(min=0).sqrt().float()
        kept = (p.alpha * std.unsqueeze(-1) * torch.sign(units(taus, p.scope))).reshape(taus.shape) * mask
    w = torch.tensor(weights, dtype=torch.float32).reshape(-1, *[1] * base.dim())
    return base + p.lambda_ * (w * kept).sum(0)


class TransferParams(Strict):
    lambda_: float = Field(default=1.0, alias="lambda")
    """Scale of the transferred update theta'_s - theta_s (official: 1)."""


@register("transfer", TransferParams, files_from=1, n_models=(2, 2))
def transfer(base, models, weights, p: TransferParams, ctx: Context):
    """Fine-tuning transfer (Lin et al., 2025, arXiv:2503.20110, Sec. 2; official
    ``run_transfer_finetuning.py``): theta'_t = theta_t + lambda * (theta'_s - theta_s). The base is
    the source base theta_s; models are, in this order, its fine-tune theta'_s and the target base
    theta_t (weights are not used). Every tensor is transferred, embeddings and head included;
    config and tokenizer files come from the fine-tune, as in the official code."""
    if len(models) != 2:
        raise ConfigError(f"transfer takes two models, the source fine-tune then the target base; got {len(models)}")
    source, target = models[0].float(), models[1].float()
    return target + p.lambda_ * (source - base.float())


class GraftParams(Strict):
    density: float = Field(default=0.01, gt=0, le=1)
    """Kept fraction of each task vector, its top |tau_i| over ``scope`` (the paper's regions are
    ~0.01% of the parameters, official ``sparsity_level`` 1e-5; 0.01 here because small models
    need more)."""
    lambda_: float = Field(default=1.0, alias="lambda")
    """Scale of the combined grafts added to the base (1: each graft as the paper makes it)."""
    scope: Scope = "global"
    """Where the top-k is taken (official basepatch: the whole model)."""


@register("graft", GraftParams)
def graft(base, models, weights, p: GraftParams, ctx: Context):
    """Grafted specialists combined (Panigrahi et al., 2023, "Task-Specific Skill Localization in
    Fine-tuned Language Models", arXiv:2302.06600; basepatch grafts theta_0 + gamma * tau, official
    ``create_basepatch`` / ``interpolate_model``): each model contributes its task vector on its
    basepatch gamma_i, the top ``density`` magnitudes of tau_i (over the whole model by default),
    theta_0 + lambda * sum_i w_i gamma_i tau_i / max(1, sum_i gamma_i). The paper finds the regions
    of different tasks nearly disjoint; where k > 1 grafts do overlap, the entry takes the mean of
    their w_i tau_i, so two grafts of one entry do not add up (a weighted divisor would cancel
    w_i on the disjoint entries). One model with density 1 and weight 1 gives that model."""
    b, taus = _deltas(base, models)
    keep = top_mask(taus, p.density, p.scope, ctx, "graft_top").float()  # (M, *shape) gamma_i
    w = torch.tensor(weights, dtype=torch.float32).reshape(-1, *[1] * b.dim())
    coef = p.lambda_ * w * keep / keep.sum(0).clamp(min=1)  # (M, *shape)
    # (1 - sum c_i) theta_0 + sum c_i theta_i = theta_0 + sum c_i tau_i, exact at c = 0 and at one c = 1
    thetas = torch.stack([m.float() for m in models])
    merged = (1 - coef.sum(0)) * b + (coef * thetas).sum(0)
    return torch.where(keep.any(0), merged, b)


# -- exact order statistics of large tensors ----------------------------------------------------

def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of 1-D ``values``, exactly.

    Large tensors go through a sample first (Floyd & Rivest, 1975, "Expected time bounds for
    selection"): a seeded sample of 2^20 entries brackets the answer, one pass counts what lies
    below the bracket, and ``kthvalue`` runs on the few entries inside it. The answer does not
    depend on the sample; a bracket that misses (rare) falls back to ``kthvalue`` on everything.
    """
    n = values.numel()
    if k == n:
        return values.max()
    if k == 1:
        return values.min()
    if n <= 1 << 22:
        return values.kthvalue(k).values
    return kth_of(n, k, lambda at: values[at])


def kth_of(n: int, k: int, entries: Callable[[torch.Tensor | slice], torch.Tensor], chunk: int = 1 << 22) -> torch.Tensor:
    """:func:`kth_smallest` of ``n`` values that are never held at once: ``entries(at)`` gives the values
    at an index tensor or a slice (e.g. |theta_i - theta_0| computed from two stored tensors), read
    ``chunk`` at a time; only the sample and the entries inside its bracket are kept."""
    s = 1 << 20
    sample = entries(torch.randint(n, (s,), generator=torch.Generator().manual_seed(0)))
    q, spread = k / n, 8 / s**0.5
    lo = sample.kthvalue(max(1, int((q - spread) * s))).values
    hi = sample.kthvalue(min(s, int((q + spread) * s) + 1)).values
    below, inside = 0, []
    for start in range(0, n, chunk):
        part = entries(slice(start, start + chunk))
        below += int(torch.count_nonzero(part < lo))  # count_nonzero: 20x faster than a bool sum
        inside.append(part[(part >= lo) & (part <= hi)])
    within = torch.cat(inside)
    if below < k <= below + within.numel():
        return within.kthvalue(k - below).values
    return torch.cat([entries(slice(start, start + chunk)) for start in range(0, n, chunk)]).kthvalue(k).values
