"""mergekit 0.1.5's spherical averages of several models: ``multislerp`` and ``karcher``.

As in :mod:`mixtune.merge.compat`, each function gets the inputs already cast to the compute dtype D
(the config's ``dtype``, else the stored dtypes promoted; mergekit/merge_methods/base.py:455-458)
and takes mergekit's operations in mergekit's order, so that the tensors agree bit for bit. Their
norms, dot products and means run over the whole tensor, as mergekit's do, so that they round alike.

Notation: theta_0 the base, theta_i the models, tau_i = theta_i - theta_0, w_i the weights,
u_i = x_i / ||x_i|| the directions of the vectors x_i that are averaged.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mixtune.core import ConfigError, Strict
from mixtune.merge.compat import _accumulator
from mixtune.merge.context import Context
from mixtune.merge.methods import register

# -- multislerp ----------------------------------------------------------------------------------


class MultislerpParams(Strict):
    normalize_weights: bool = True
    """Divide the weights by their sum (mergekit's default); false takes them as given."""
    eps: float = Field(default=1e-8, ge=0)
    """Added to each norm before dividing by it, and the length below which the weighted mean of
    the directions counts as zero (mergekit's default 1e-8)."""


@register("multislerp", MultislerpParams, needs_base=False, optional_base=True, mergekit=True)
def multislerp(base, models, weights, p: MultislerpParams, ctx: Context):
    """Multi-SLERP (Goddard, 2025, "Multi-SLERP", goddard.blog/posts/multislerp-wow-what-a-cool-idea),
    a barycentre of several models on the sphere, as mergekit 0.1.5 runs it (Goddard et al., 2024,
    arXiv:2403.13257; mergekit/merge_methods/multislerp.py:21-108), each tensor flattened, in the
    inputs' dtype: x_i = theta_i (or tau_i with a base), w normalised to sum 1 unless told not to,
    u_i = x_i / (||x_i|| + eps); m = sum_i w_i u_i / ||sum_i w_i u_i||; the tangent vector
    v = sum_i w_i (u_i - (u_i . m) m); the result (m cos|v| + v sin|v| / |v|) * sum_i w_i ||x_i||
    with |v| = ||v|| + eps (plus theta_0 with a base). One model gives that model; two whose
    weighted directions cancel give w_1 x_1 + w_2 x_2."""
    if len(models) == 1:
        return models[0]
    shape, k = models[0].shape, len(models)
    x = torch.stack(models)  # (k, *shape)
    if base is not None:
        x -= base
    flat = x.reshape(k, -1)  # (k, n)
    w = torch.tensor(weights, dtype=x.dtype)
    if p.normalize_weights:
        total = w.sum()
        if float(total) == 0:
            raise ConfigError(f"{ctx.key}: multislerp weights {weights} sum to 0; set normalize_weights: false "
                              "or change the weights")
        w = w / total
    w_col = w.view(-1, 1)
    # 1) project onto the unit sphere; the weighted mean of the directions
    norms = torch.norm(flat, dim=-1, keepdim=True)  # (k, 1)
    u = flat / (norms + p.eps)
    mean = (u * w_col).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < p.eps:  # no mean direction: antipodal inputs whose weights balance
        if k == 2:
            out = (x[0] * w[0] + x[1] * w[1]).view(shape)
            return out if base is None else out + base
        raise ConfigError(f"{ctx.key}: multislerp's weighted mean of the models' directions is zero (antipodal "
                          "models with weights that balance); change the weights")
    mean = mean / mean_norm
    # 2) into the tangent space at the mean, and the weighted mean there
    cos = (u * mean).sum(-1, keepdim=True)  # (k, 1)
    tangent = ((u - cos * mean) * w_col).sum(0)
    # 3) back onto the sphere (the exponential map), scaled to the weighted mean norm
    length = torch.norm(tangent) + p.eps
    out = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    out = (out * (norms.squeeze(-1) * w).sum()).view(shape)
    return out if base is None else out + base


# -- karcher -------------------------------------------------------------------------------------


class KarcherParams(Strict):
    max_iter: int = Field(default=10, ge=0)
    """Most fixed-point steps of the mean's direction (mergekit's default 10)."""
    tol: float = Field(default=1e-5, ge=0)
    """The iteration stops when a step is shorter; a model whose norm is not above it, and an angle
    below it, are left out of the direction (mergekit's default 1e-5)."""


@register("karcher", KarcherParams, needs_base=False, mergekit=True, weighted=False)
def karcher(base, models, weights, p: KarcherParams, ctx: Context):
    """Karcher mean (Karcher, 1977; as a merge: Wang, Ye & Yin, 2026, arXiv:2603.04972, its spherical
    proxy) as mergekit 0.1.5 runs it (mergekit/merge_methods/karcher.py:118-194), each tensor
    flattened, in the inputs' dtype with the norms in float32: with equal weights a_i = 1/k and
    u_i = theta_i / ||theta_i||, the direction m starts at the normalised mean of the u_i and takes
    up to ``max_iter`` steps m <- cos|g| m + sin|g| g / |g|, renormalised, with
    g = sum_i a_i phi_i / sin(phi_i) (u_i - cos(phi_i) m) and cos(phi_i) = u_i . m (the Riemannian
    gradient of the mean squared geodesic distance), stopping when |g| < tol; the result is
    m sum_i a_i ||theta_i||. mergekit counts a ``base_model`` as one more model (a mergekit
    config's base is read into ``models``)."""
    if len(models) == 1:
        return models[0]
    dtype = models[0].dtype
    acc = _accumulator(dtype)  # mergekit takes every norm in float32 (float64 for float64 inputs)
    alpha = [1.0 / len(models)] * len(models)
    norms = [torch.linalg.vector_norm(m.to(acc)) for m in models]  # 0-d tensors: they enter the result
    kept = [i for i, n in enumerate(norms) if float(n) > p.tol]
    if not kept:  # every model (nearly) zero
        return torch.zeros_like(models[0])
    total = sum(alpha[i] for i in kept)
    a = [alpha[i] / total for i in kept]  # the weights renormalised over the non-zero models
    u = [(models[i] / norms[i]).to(dtype) for i in kept]  # the directions (tol >= 0: no norm is 0 here)
    # 1) the starting direction: the normalised weighted mean of the directions
    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):
        mean += ai * ui
    length = torch.linalg.vector_norm(mean.to(acc))
    mean = u[0].clone() if float(length) < p.tol else (mean / length).to(dtype)
    # 2) fixed-point steps along the Riemannian gradient (log maps summed, then the exponential map)
    for _ in range(p.max_iter):
        step = torch.zeros_like(mean)
        for ai, ui in zip(a, u):
            cos = torch.clamp(torch.dot(mean.flatten(), ui.flatten()), -1.0, 1.0)
            angle = torch.arccos(cos)
            if float(angle) < p.tol:  # u_i is (nearly) the mean: its log map is 0
                continue
            step += ai * (angle / torch.sin(angle)) * (ui - cos * mean)
        size = torch.linalg.vector_norm(step.to(acc))
        if float(size) < p.tol:
            break
        mean = (torch.cos(size) * mean + torch.sin(size) * (step / size)).to(dtype)
        size = torch.linalg.vector_norm(mean.to(acc))
        if float(size) > p.tol:
            mean = (mean / size).to(dtype)
    # 3) the length: the mean of the norms, over every model (the zero ones included)
    scale = sum(ai * n for ai, n in zip(alpha, norms))
    return scale * mean
