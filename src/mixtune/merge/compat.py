"""mergekit 0.1.5's methods under mergekit's names, operation for operation.

A mergekit config run through mixtune gives the tensors mergekit gives, bit for bit, in every dtype,
for the deterministic methods (``linear``, ``task_arithmetic``, ``ties``, ``breadcrumbs``,
``breadcrumbs_ties``, ``slerp``, ``nuslerp``, ``model_stock``, ``passthrough``), and the same
statistics for the random ones (``dare_linear``, ``dare_ties``, ``della``, ``della_linear``), whose
masks mergekit draws from torch's global generator in its own tensor order.

How mergekit computes, and so how these do:

- **dtype.** mergekit casts every input to the config's ``dtype`` as it loads it
  (mergekit/io/tasks.py:124-125, ``LoadTensor``), or leaves it as stored; the method then gets the
  inputs promoted to one dtype D (mergekit/merge_methods/base.py:455-458, dtype.py:14-32) and
  computes in D, except where its kernel upcasts: ``linear`` and ``slerp`` accumulate in float32
  (float64 for float64 inputs) and return D; the rest compute in D itself, bf16 included (task
  vectors, sparsification, weights as D tensors, sign election, sums, the division). The result is
  cast to ``out_dtype`` when it is saved (mergekit/io/tasks.py:232-233). mixtune's run casts the
  inputs to D before calling these functions, which then return D.
- **Selection.** mergekit ranks magnitudes with torch's sort (not stable) on float32 copies; where
  equal magnitudes straddle the cut (common in bf16), which of them survive is that sort's order,
  so the same sort is taken there (and a cheaper exact threshold everywhere else).
- Elementwise steps run a million entries at a time (the result of each entry does not depend on
  the chunking, tested); sums over a whole tensor (L1 rescaling, norms, model_stock's cosines) are
  taken over the whole tensor, as mergekit takes them, so that they round alike.

Notation: theta_0 the base, tau_i = theta_i - theta_0, w_i the weights, d a kept fraction.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from pydantic import Field

from mixtune.core import ConfigError, Strict
from mixtune.merge.context import Context
from mixtune.merge.methods import MERGE_METHODS, MergeMethod, kth_smallest, register

CHUNK = 1 << 20
"""Elements combined at a time by the elementwise methods: their working set stays in cache."""


def chunks(n: int, size: int = CHUNK):
    """Slices covering range(n), ``size`` at a time."""
    return (slice(lo, min(n, lo + size)) for lo in range(0, n, size))


def parallel(fn, items: list, large: bool) -> list:
    """``[fn(x) for x in items]``, on up to torch's thread count of threads when ``large`` (torch's
    sort, which mergekit's top-k and rank ranges need, runs on one thread: one per model fills the
    cores; the results do not depend on the threads)."""
    workers = min(len(items), torch.get_num_threads())
    if not large or workers < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """What mergekit's linear and slerp accumulate in: float64 for float64 inputs, else float32
    (mergekit/merge_methods/linear.py:28, slerp.py:34, batching.py:55-64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- linear ------------------------------------------------------------------------------------

class LinearParams(Strict):
    normalize: bool = True
    """Divide by the sum of the weights (a weighted mean); false gives the weighted sum."""


@register("linear", LinearParams, needs_base=False, mergekit=True)
def linear(base, models, weights, p: LinearParams, ctx: Context):
    """Model soups (Wortsman et al., 2022, arXiv:2203.05482, uniform soup): sum_i w_i theta_i /
    sum_i w_i; equal weights give the uniform soup. mergekit's ``linear``
    (mergekit/merge_methods/linear.py:20-38): accumulated in float32 from zeros with one
    ``addcmul`` per model (a fused multiply-add), divided by the float32 sum of the weights, cast
    to the inputs' dtype."""
    dtype = models[0].dtype
    acc_dtype = _accumulator(dtype)
    w = torch.tensor(weights, dtype=acc_dtype)
    denominator = w.sum()
    if p.normalize and float(denominator) == 0:
        raise ConfigError(f"{ctx.key}: linear weights {weights} sum to 0; set normalize: false for a weighted sum")
    flat = [m.reshape(-1) for m in models]
    out = torch.empty(flat[0].numel(), dtype=dtype)
    for part in chunks(out.numel()):
        acc = torch.zeros(part.stop - part.start, dtype=acc_dtype)
        for coefficient, m in zip(w, flat):
            acc.addcmul_(m[part], coefficient)
        if p.normalize:
            acc.div_(denominator)
        out[part] = acc
    return out.reshape(models[0].shape)


# -- generalized task arithmetic (mergekit/merge_methods/generalized_task_arithmetic.py) ----------

class MergekitModelParams(Strict):
    density: float = Field(default=1.0, ge=0, le=1)
    """Kept fraction of this model's delta; 1 (the default) sparsifies nothing."""
    gamma: float = Field(default=0.01, ge=0, le=1)
    """Breadcrumbs only: largest-magnitude fraction removed."""
    epsilon: float = Field(default=0.15, ge=0, le=1)
    """DELLA only: keep probabilities run from density - epsilon (smallest magnitude of a row) to
    density + epsilon (largest); both must lie inside (0, 1)."""


class MergekitParams(Strict):
    normalize: bool | None = None
    """Divide by the (agreeing) weights' sum; default per method (true for ties and della)."""
    rescale: bool | None = None
    """After sparsifying, match the delta's L1 norm; default per method (true for dare_* and della*)."""
    lambda_: float = Field(default=1.0, alias="lambda")
    """Scale of the merged delta added to the base (mergekit's lambda, default 1)."""
    int8_mask: bool = False
    """Accepted for compatibility; it changes mergekit's memory use, not its results."""


HALF = (torch.bfloat16, torch.float16)


def _value_counts(mag: torch.Tensor) -> torch.Tensor | None:
    """How many entries of the non-negative 1-D ``mag`` take each value, indexed by the value's 16-bit
    pattern, for bfloat16 and float16 ``mag`` (their non-negative patterns, read as integers, are in
    the values' order); None for other dtypes. One pass: exact order statistics without selection."""
    if mag.dtype not in HALF:
        return None
    return torch.bincount(mag.view(torch.int16).to(torch.int32), minlength=1 << 15)


def _sorted_mask(mag: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    """Mask of ``torch.sort(mag.float(), descending).indices[start:stop]``: the sort mergekit takes, whose
    order among equal values (it is not stable) is its own, so only the sort itself reproduces it.
    Half-precision magnitudes are sorted as their 16-bit patterns, which compare as the values do:
    torch's CPU sort of floats and its descending sort of integers are the same comparison sort
    (std::sort), so the order is the same (tested) and fewer bytes move. Its ascending sort of
    integers is a different (radix) sort, so an ascending order is taken as the descending order of
    the negated patterns: every comparison comes out as before."""
    if mag.dtype in HALF:
        keys = mag.view(torch.int16) if descending else -mag.view(torch.int16)
        descending = True
    else:
        keys = mag.float()
    mask = torch.zeros(mag.numel(), dtype=torch.bool)
    mask[torch.sort(keys, descending=descending).indices[start:stop]] = True
    return mask


def top_k_mask(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the entries ``torch.argsort(mag.float(), descending=True)[:k]`` keeps (mergekit's
    magnitude sparsification, mergekit/sparsify.py:56-78), for non-negative 1-D ``mag``. The k-th
    largest value v is found by counting values (half precision) or by selection; when every entry
    equal to v makes the cut the mask is ``mag >= v``, else the tied entries are split by the sort's
    own order, so the sort is taken."""
    n = mag.numel()
    counts = _value_counts(mag)
    if counts is not None:
        at_least = counts.flip(0).cumsum(0).flip(0)  # entries >= each value
        bits = int(torch.count_nonzero(at_least >= k)) - 1  # the k-th largest value's pattern
        above, equal = int(at_least[bits]) - int(counts[bits]), int(counts[bits])
        v = torch.tensor(bits, dtype=torch.int16).view(mag.dtype)
    else:
        v = kth_smallest(mag, n - k + 1)
        above, equal = int(torch.count_nonzero(mag > v)), int(torch.count_nonzero(mag == v))
    if above + equal == k:
        return mag >= v
    return _sorted_mask(mag, 0, k, descending=True)


def rank_range(mag: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mask of ``torch.sort(mag.float()).indices[start:stop]`` (mergekit's magnitude_outliers,
    mergekit/sparsify.py:81-115), for non-negative 1-D ``mag``: by counting values (half precision)
    or two selections when no run of equal values straddles either end, by the sort itself when one does."""
    n = mag.numel()
    if stop <= start or n == 0:
        return torch.zeros(n, dtype=torch.bool)
    counts = _value_counts(mag)
    if counts is not None:
        at_most = counts.cumsum(0)  # entries <= each value
        lo_bits = int(torch.count_nonzero(at_most < start + 1))  # the (start+1)-th smallest's pattern
        hi_bits = int(torch.count_nonzero(at_most < stop))
        clean = int(at_most[lo_bits] - counts[lo_bits]) == start and int(at_most[hi_bits]) == stop
        lo, hi = (torch.tensor(b, dtype=torch.int16).view(mag.dtype) for b in (lo_bits, hi_bits))
    else:
        lo, hi = kth_smallest(mag, start + 1), kth_smallest(mag, stop)
        clean = int(torch.count_nonzero(mag < lo)) == start and int(torch.count_nonzero(mag <= hi)) == stop
    if clean:
        return (mag >= lo) & (mag <= hi)
    return _sorted_mask(mag, start, stop, descending=False)


def random_keep(n: int, density: float, rng: torch.Generator) -> torch.Tensor:
    """A mask keeping each of n entries independently with probability ``density`` (to 2^-32):
    uniform 32-bit integers below density * 2^32, drawn by numpy's PCG64 (4x faster than
    ``torch.rand`` here) from a seed the torch generator gives."""
    gen = np.random.default_rng(int(torch.randint(2**62, (1,), generator=rng)))
    bits = gen.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
    return torch.from_numpy(bits < np.uint32(min(2**32 - 1, round(density * 2**32))))


def della_keep(delta: torch.Tensor, density: float, epsilon: float, rng: torch.Generator) -> torch.Tensor:
    """DELLA's MagPrune (Deep et al., 2024, arXiv:2406.11617, Sec. 3) as mergekit 0.1.5 draws it
    (mergekit/sparsify.py:137-174): within each row (dim 1; a 1-D tensor is one row), the entry of
    ascending magnitude rank r of n is kept with probability (d - eps) + 2 eps r / (n - 1).

    The mask is random, so it is compared with mergekit's by its statistics: ranks come from one sort
    (not mergekit's argsort of an argsort), of half-precision magnitudes as their 16-bit patterns
    (equal values in whatever order that sort leaves them, as in mergekit's), a block of rows at a
    time so that the sort's buffers stay small."""
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    n = rows.shape[1]
    keep = torch.empty(rows.shape, dtype=torch.bool)
    step = max(1, CHUNK // max(1, n * math.prod(rows.shape[2:])))
    for lo in range(0, rows.shape[0], step):
        block = rows[lo:lo + step].abs()
        keys = block.view(torch.int16) if block.dtype in HALF else block
        order = keys.argsort(dim=1)  # the rank of each entry is where the sort puts it (0-based, ascending)
        ranks = torch.empty(block.shape)
        ranks.scatter_(1, order, torch.arange(n, dtype=ranks.dtype).reshape(1, n, *[1] * (block.dim() - 2))
                       .expand(block.shape))
        rank_norm = ranks / (n - 1) if n > 1 else torch.zeros_like(ranks)  # mergekit gives 0/0 there
        probs = (density - epsilon) + rank_norm * 2 * epsilon
        keep[lo:lo + step] = torch.rand(block.shape, generator=rng) < probs
    return keep.reshape(delta.shape)


def l1_scale(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """mergekit's L1 rescale factor ||delta||_1 / ||delta * mask||_1 as a tensor of delta's dtype,
    summed over the whole tensor as mergekit sums it (mergekit/sparsify.py:23-53); None when
    either norm is below 1e-7 (no rescale)."""
    before = delta.abs().sum()
    after = (delta * mask).abs().sum()
    if before < 1e-7 or after < 1e-7:
        return None
    return before / after


def _l1_kept(base: torch.Tensor, model: torch.Tensor, keep: torch.Tensor) -> tuple[float, float]:
    """||model - base||_1 and its part under ``keep`` (flat tensors), a chunk at a time (random
    masks: the factor cannot match mergekit's draw anyway, so it is summed cheaply)."""
    before = after = 0.0
    for part in chunks(base.numel()):
        d = torch.sub(model[part], base[part]).float().abs_()
        before += float(d.sum())
        after += float(d.mul_(keep[part]).sum())
    return before, after


def mergekit_keep(delta: torch.Tensor, mp: MergekitModelParams, kind: str, rng: torch.Generator, *,
                  rescale: bool = False, where: str = "tensor"):
    """The keep-mask and rescale factor of :func:`mergekit_sparsify` (None and None: nothing dropped,
    nothing scaled). ``delta`` is in the compute dtype, shaped as the parameter."""
    d = mp.density
    if d >= 1:
        return None, None
    n = delta.numel()
    if kind == "magnitude":
        if d <= 0 or n == 0:
            return torch.zeros(delta.shape, dtype=torch.bool), None
        mask = top_k_mask(delta.abs().reshape(-1), max(1, int(d * n))).reshape(delta.shape)
    elif kind == "outliers":
        keep, top = int(d * n), int(mp.gamma * n)
        bottom = max(0, n - keep - top)
        mask = rank_range(delta.abs().reshape(-1), bottom, bottom + keep).reshape(delta.shape)
    elif kind == "della":
        if d <= 0:
            return torch.zeros(delta.shape, dtype=torch.bool), None
        if d + mp.epsilon >= 1 or d - mp.epsilon <= 0:
            raise ConfigError(f"{where}: della needs density +/- epsilon inside (0, 1); got density {d}, "
                              f"epsilon {mp.epsilon}")
        mask = della_keep(delta, d, mp.epsilon, rng)
    else:
        raise ValueError(f"unknown sparsification {kind!r}")
    return mask, (l1_scale(delta, mask) if rescale else None)


def mergekit_sparsify(delta: torch.Tensor, density: float, kind: str, rng: torch.Generator, *, gamma: float = 0.01,
                      epsilon: float = 0.15, rescale: bool = False) -> torch.Tensor:
    """mergekit 0.1.5's ``sparsify`` (mergekit/sparsify.py:177-198) on one delta, in its dtype:
    ``magnitude`` keeps the top max(1, int(d n)) magnitudes of the whole tensor (TIES, Yadav et al.,
    2023, arXiv:2306.01708, trim step, per tensor); ``outliers`` keeps ascending magnitude ranks
    [b, b + int(d n)) with b = max(0, n - int(d n) - int(g n)) (Breadcrumbs, Davari & Belilovsky,
    2024, arXiv:2312.06795); ``random`` keeps each entry with probability d (DARE, Yu et al., 2024,
    arXiv:2311.03099); ``della`` with a probability rising with the magnitude's rank in its row.
    ``rescale`` multiplies the kept entries by ||delta||_1 / ||kept||_1 unless either is below
    1e-7. d >= 1 returns delta."""
    mp = MergekitModelParams(density=density, gamma=gamma, epsilon=epsilon)
    if kind == "random":
        if density >= 1:
            return delta
        mask = random_keep(delta.numel(), density, rng).reshape(delta.shape)
        scale = l1_scale(delta, mask) if rescale else None
    else:
        mask, scale = mergekit_keep(delta, mp, kind, rng, rescale=rescale)
    if mask is None:
        return delta
    out = delta * mask
    return out if scale is None else out * scale


def _gta(sparsify: str | None, consensus: bool, normalize: bool, rescale: bool):
    """mergekit's ``GeneralizedTaskArithmeticMerge.merge_group``
    (mergekit/merge_methods/generalized_task_arithmetic.py:91-145) for one preset, in the inputs'
    dtype D: tau_i = theta_i - theta_0, sparsified, times w_i (a D tensor); with consensus the sign
    of sum_i w_i tau_i (0 counts as +) and only agreeing entries, divided by their weights' sum when
    normalizing (else the weights' sum, when not below 1e-8); times lambda; plus theta_0."""

    def merge(base, models, weights, p: MergekitParams, ctx: Context):
        per_model = ctx.per_model or [MergekitModelParams()] * len(models)
        norm = normalize if p.normalize is None else p.normalize
        resc = rescale if p.rescale is None else p.rescale
        dtype = base.dtype
        flat_base, flat_models = base.reshape(-1), [m.reshape(-1) for m in models]
        n = flat_base.numel()
        # 1) each model's keep-mask and rescale factor: a top-k or rank range, and an exact L1 factor,
        #    need the model's whole delta; a random mask and its (approximate) factor do not
        keeps: list = [(None, None)] * len(models)
        ranked = []  # models whose mask is a top-k, a rank range or MagPrune's draw over ranks
        for i, (m, mp) in enumerate(zip(models, per_model)):
            if not sparsify or mp.density >= 1:
                continue
            if sparsify == "random":
                keep, scale = random_keep(n, mp.density, ctx.rng), None
                if resc:
                    before, after = _l1_kept(flat_base, m.reshape(-1), keep)
                    scale = before / after if before >= 1e-7 and after >= 1e-7 else None
                keeps[i] = (keep, scale)
            else:
                ranked.append(i)

        def ranked_keep(i: int):
            mask, scale = mergekit_keep(models[i] - base, per_model[i], sparsify, ctx.rng, rescale=resc, where=ctx.key)
            return mask.reshape(-1), scale

        # a top-k or rank range is a sort per model: one per thread, the largest tensors (embeddings) one at a
        # time so that several models' sort buffers (16 bytes an entry) are not held at once; DELLA draws from
        # the tensor's one generator, so its models go in order (the same draws every run)
        threads = sparsify != "della" and CHUNK <= n <= 16 * CHUNK
        for i, kept in zip(ranked, parallel(ranked_keep, ranked, large=threads)):
            keeps[i] = kept
        # 2) the combination is elementwise: a chunk at a time, each step the operation mergekit takes
        w = torch.tensor(weights, dtype=dtype)  # mergekit's weights are D tensors
        total = w.sum()
        if total.abs() < 1e-8:
            total = torch.ones((), dtype=dtype)
        one = torch.ones((), dtype=dtype)
        out = torch.empty(n, dtype=dtype)
        deltas = torch.empty((len(models), min(n, CHUNK)), dtype=dtype)
        for part in chunks(n):
            b = flat_base[part]
            d = deltas[:, : b.numel()]
            for i, (m, (keep, scale)) in enumerate(zip(flat_models, keeps)):
                torch.sub(m[part], b, out=d[i])
                if keep is not None:
                    d[i].mul_(keep[part])
                if scale is not None:
                    d[i].mul_(scale)
                if weights[i] != 1.0:
                    d[i].mul_(w[i])
            if consensus:  # sign of the weighted sum (0 and -0 count as +); zeros agree with neither sign
                sign = torch.where(d.sum(0) >= 0, one, -one)
                aligned = (d * sign).clamp_(min=0)  # |d| where d agrees with the sign, else 0
                mixed = aligned.sum(0).mul_(sign)  # = mergekit's (deltas * mask).sum(0), sign for sign
                if norm:
                    divisor = (w.reshape(-1, 1) * (aligned > 0)).sum(0)
                    mixed /= divisor.masked_fill_(divisor == 0, 1)
            else:
                mixed = d.sum(0)
                if norm:
                    mixed /= total
            if p.lambda_ != 1:
                mixed *= p.lambda_
            out[part] = mixed.add_(b)
        return out.reshape(base.shape)

    return merge


for _name, _sp, _cons, _norm, _resc, _cite in [
    ("task_arithmetic", None, False, False, False,
     "Task arithmetic (Ilharco et al., 2023, arXiv:2212.04089, Sec. 2): theta_0 + lambda * sum_i w_i tau_i; "
     "negative weights negate a task. mergekit's task_arithmetic (optional normalize)."),
    ("ties", "magnitude", True, True, False,
     "TIES-Merging (Yadav et al., 2023, arXiv:2306.01708) as mergekit 0.1.5 runs it: per-tensor top-k trim "
     "(density 1 = none), sign elected on weighted deltas (0 -> +), agreeing entries divided by their weights' sum."),
    ("dare_linear", "random", False, False, True,
     "DARE (Yu et al., 2024, arXiv:2311.03099) as mergekit 0.1.5 runs it: random keep with probability density, "
     "L1-norm rescale, weighted sum x lambda."),
    ("dare_ties", "random", True, False, True,
     "DARE-TIES (Yu et al., 2024, arXiv:2311.03099) as mergekit 0.1.5 runs it: random keep + L1 rescale, sign "
     "consensus, weighted sum of agreeing entries (not a mean), no magnitude trim."),
    ("breadcrumbs", "outliers", False, False, False,
     "Model Breadcrumbs (Davari & Belilovsky, 2024, arXiv:2312.06795) as mergekit 0.1.5 runs it: per tensor, drop "
     "the top gamma and the bottom, keep density; weighted sum x lambda."),
    ("breadcrumbs_ties", "outliers", True, False, False,
     "Model Breadcrumbs (Davari & Belilovsky, 2024, arXiv:2312.06795) with mergekit 0.1.5's sign consensus."),
    ("della", "della", True, True, True,
     "DELLA-Merging (Deep et al., 2024, arXiv:2406.11617) as mergekit 0.1.5 runs it: MagPrune keeps each entry with "
     "a probability from density - epsilon to density + epsilon by its magnitude's rank in its row, L1-norm rescale "
     "(not the paper's 1/p), sign consensus, agreeing entries divided by their weights' sum, x lambda."),
    ("della_linear", "della", False, False, True,
     "DELLA-Merging (Deep et al., 2024, arXiv:2406.11617) without the sign election, as mergekit 0.1.5's "
     "della_linear: MagPrune + L1-norm rescale, weighted sum x lambda."),
]:
    _fn = _gta(_sp, _cons, _norm, _resc)
    _fn.__doc__ = _cite
    _fn.__name__ = _name
    MERGE_METHODS.add(_name, MergeMethod(_fn, MergekitParams, True, MergekitModelParams, mergekit=True), doc=_cite)


# -- spherical interpolation ---------------------------------------------------------------------

SLERP_CHUNK = 1024 * 1024
"""mergekit's ``_CHUNK_ELEMENTS`` (mergekit/merge_methods/slerp.py:17): the norms and the dot
product are summed a chunk at a time and then over the chunks, so the chunking sets their rounding."""


class SlerpParams(Strict):
    t: float
    """Interpolation factor from the base (0) to the other model (1); usually a gradient over the
    layers or a list of {filter, value} (mergekit's ``t``, required)."""


@register("slerp", SlerpParams, mergekit=True, n_models=(1, 1), weighted=False)
def slerp(base, models, weights, p: SlerpParams, ctx: Context):
    """SLERP (Shoemake, 1985, "Animating rotation with quaternion curves") of the base theta_0 and
    one model theta_1, each tensor flattened, as mergekit 0.1.5 runs it (Goddard et al., 2024,
    arXiv:2403.13257; mergekit/merge_methods/slerp.py:20-101): in float32, with a = theta_0 /
    ||theta_0||, b = theta_1 / ||theta_1|| (a norm below 1e-8 taken as 1), cos O = clamp(a . b),
    the result is sin((1 - t) O) / sin O theta_0 + sin(t O) / sin O theta_1, or (1 - t) theta_0 +
    t theta_1 where |cos O| > 0.9995; cast to the inputs' dtype."""
    v0, v1 = base, models[0]
    dtype = _accumulator(v0.dtype)
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    t = torch.tensor([p.t], dtype=dtype).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    size, n, eps = SLERP_CHUNK, a.shape[1], 1e-8
    norm_a_parts, norm_b_parts = [], []
    for lo in range(0, n, size):
        norm_a_parts.append(torch.linalg.vector_norm(a[:, lo:lo + size].to(dtype), dim=1, keepdim=True))
        norm_b_parts.append(torch.linalg.vector_norm(b[:, lo:lo + size].to(dtype), dim=1, keepdim=True))
    norm_a = torch.linalg.vector_norm(torch.stack(norm_a_parts), dim=0)  # the norm of the chunks' norms
    norm_b = torch.linalg.vector_norm(torch.stack(norm_b_parts), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot_parts = []
    for lo in range(0, n, size):  # normalised before multiplying, so the dot cannot overflow
        x = a[:, lo:lo + size].to(dtype) / norm_a
        y = b[:, lo:lo + size].to(dtype) / norm_b
        dot_parts.append((x * y).sum(dim=1, keepdim=True))
    dot = torch.stack(dot_parts).sum(dim=0).clamp(-1, 1)
    linear_ = dot.abs() > 0.9995  # nearly collinear (or antipodal): interpolate linearly
    theta = torch.acos(torch.where(linear_, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear_, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear_, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a)  # in the inputs' dtype: each chunk is rounded as it is stored
    for lo in range(0, n, size):
        result[:, lo:lo + size] = coef_a * a[:, lo:lo + size].to(dtype) + coef_b * b[:, lo:lo + size].to(dtype)
    return result.reshape(v0.shape)


class NuslerpParams(Strict):
    nuslerp_row_wise: bool = False
    """Interpolate each column vector (dim 0) instead of each row; with ``nuslerp_flatten`` false."""
    nuslerp_flatten: bool = True
    """Treat the whole tensor as one vector (mergekit's default)."""


def _nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int, flatten: bool) -> torch.Tensor:
    """mergekit's ``nuslerp`` (mergekit/merge_methods/nuslerp.py:16-50), in the inputs' dtype."""
    out_shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    v0_u = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    v1_u = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = torch.sum(v0_u * v1_u, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= 1e-8 ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


@register("nuslerp", NuslerpParams, needs_base=False, optional_base=True, mergekit=True, n_models=(2, 2))
def nuslerp(base, models, weights, p: NuslerpParams, ctx: Context):
    """SLERP (Shoemake, 1985) of two models as mergekit 0.1.5's ``nuslerp`` (Goddard et al., 2024,
    arXiv:2403.13257; mergekit/merge_methods/nuslerp.py:63-89), in the inputs' dtype: t = w_2 /
    (w_1 + w_2) (0.5 when the sum is below 1e-6), between the whole tensors (default), their rows
    or their columns; with a base, between the task vectors tau_1, tau_2, added to theta_0."""
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if p.nuslerp_row_wise else -1
    if base is not None:
        return base + _nuslerp(t, models[0] - base, models[1] - base, dim, p.nuslerp_flatten)
    return _nuslerp(t, models[0], models[1], dim, p.nuslerp_flatten)


# -- model stock ---------------------------------------------------------------------------------

class ModelStockParams(Strict):
    filter_wise: bool = False
    """One interpolation ratio per row (filter) instead of one per tensor."""


@register("model_stock", ModelStockParams, mergekit=True, n_models=(2, None), weighted=False)
def model_stock(base, models, weights, p: ModelStockParams, ctx: Context):
    """Model Stock (Jang et al., 2024, arXiv:2403.19522, Eq. 2-3) as mergekit 0.1.5 runs it
    (mergekit/merge_methods/model_stock.py:25-65), in the inputs' dtype: cos O is the mean pairwise
    cosine of the task vectors (each norm product clamped to 1e-6), t = k cos O / (1 + (k - 1)
    cos O) for k models (0 where the denominator is below 1e-6), and the result is t mean_i
    theta_i + (1 - t) theta_0; per tensor, or per row with ``filter_wise``. Weights are not used."""
    w_0, ws = base, list(models)
    out_shape = w_0.shape
    if p.filter_wise:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w_0, ws = w_0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    norms = [torch.norm(offset, dim=-1) for offset in offsets]  # each once (mergekit takes them per pair)
    cos_thetas = []
    for i, offset_a in enumerate(offsets):
        for j, offset_b in enumerate(offsets[i + 1:], start=i + 1):
            norm_product = norms[i] * norms[j]
            cos_thetas.append(((offset_a * offset_b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base there
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w_0).reshape(out_shape)


# -- passthrough ---------------------------------------------------------------------------------

class NoParams(Strict):
    """A method without parameters of its own."""


class PassthroughModelParams(Strict):
    scale: float | None = None
    """Multiply the tensor by this (mergekit's ``scale``; often a filter list, e.g. halving
    o_proj and down_proj in a frankenmerge); null copies it."""


@register("passthrough", NoParams, needs_base=False, model_params=PassthroughModelParams, mergekit=True,
          n_models=(1, 1), weighted=False)
def passthrough(base, models, weights, p: NoParams, ctx: Context):
    """Passthrough (Goddard et al., 2024, arXiv:2403.13257; mergekit/merge_methods/passthrough.py):
    each tensor copied from its one model, times ``scale`` if given, in the config's dtype; with
    ``slices`` it stacks layer ranges of several models (a frankenmerge)."""
    scale = ctx.per_model[0].scale if ctx.per_model else None
    return models[0] if scale is None else models[0] * scale
