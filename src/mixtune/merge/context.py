"""What a merge method sees besides the tensors, and whole-model statistics for ``scope: global``.

A method merges one parameter at a time. When it needs a statistic of the whole model (TIES'
global top-k threshold, ComPEFT's standard deviation, PCB's quantiles), it asks its
:class:`Context` with :meth:`Context.kth` or :meth:`Context.total`. The first time a statistic
is asked for it is not known yet: the context records what this tensor contributes and stops the
method (:class:`Pending`). :func:`resolve_globals` runs the method over every tensor in passes
until each statistic it asks for is known, then the merge pass finds them all. Nothing holds the
whole model: an order statistic takes two streaming passes (Floyd & Rivest, 1975, "Expected time
bounds for selection"): a seeded sample brackets the answer, then one pass counts the entries
below the bracket and keeps the few inside it, where the exact k-th value is found. A statistic
that needs another (PCB's score quantile needs its clipping quantiles) is found in a later pass.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

SAMPLE = 1 << 22
"""Entries sampled per row of an order statistic: its bracket spans about 6/sqrt(SAMPLE) of the ranks."""


def tensor_seed(seed: int, key: str) -> int:
    """A generator seed per tensor, so results do not depend on the order tensors are read in."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{key}".encode()).digest()[:7], "big")


class Pending(Exception):
    """Raised inside a method when it asks for a whole-model statistic that is not known yet."""


@dataclass
class _Request:
    kind: str  # "kth" or "total"
    ranks: Callable[[int], list[int]] | None = None
    samples: list = field(default_factory=list)
    count: int = 0
    total: torch.Tensor | None = None
    # gather phase: per row and rank, the bracket, the count below it and the entries inside it
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    below: torch.Tensor | None = None
    inside: list = field(default_factory=list)
    result: torch.Tensor | None = None


@dataclass
class Context:
    """One parameter's merge context.

    Attributes:
        key: the parameter's name.
        rng: a generator seeded from the merge seed and ``key`` (fresh in every pass).
        per_model: each model's validated per-model parameters.
        layer: the block index in ``key`` (None for embeddings, final norm, head).
        num_layers: the number of blocks in the model (1 + the largest index).
        known: whole-model statistics found so far, by name.
        dtype: the dtype the output tensor is written in; a paper method may return it directly
            (it computes in float32 either way); mergekit's methods return their inputs' dtype.
    """

    key: str = "tensor"
    rng: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    per_model: list = field(default_factory=list)
    layer: int | None = None
    num_layers: int = 0
    known: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    _requests: dict | None = None
    _phase: str = "merge"
    _rate: float = 1.0

    def kth(self, name: str, values: torch.Tensor, ranks: Callable[[int], list[int]]) -> torch.Tensor:
        """Order statistics of ``values`` (rows x entries of this tensor) over the whole model.

        Row r of the result holds, for each rank k in ``ranks(N)`` (1-based, N = the model's
        entry count per row), the k-th smallest value of row r across every tensor.
        """
        if name in self.known:
            return self.known[name]
        if self._requests is None:
            raise RuntimeError(f"{self.key}: statistic {name!r} asked for in the merge pass but never resolved")
        values = values.reshape(values.shape[0], -1)
        n = values.shape[1]
        if self._phase == "sample":
            req = self._requests.setdefault(name, _Request("kth", ranks))
            req.count += n
            m = min(n, math.ceil(n * self._rate))
            if m == n:
                req.samples.append(values.clone())
            else:
                g = torch.Generator().manual_seed(tensor_seed(0, self.key + "|sample"))
                req.samples.append(values[:, torch.randint(n, (m,), generator=g)])
        elif (req := self._requests.get(name)) is not None:  # gather
            for j in range(req.lo.shape[1]):
                lo, hi = req.lo[:, j:j + 1], req.hi[:, j:j + 1]
                req.below[:, j] += torch.count_nonzero(values < lo, dim=1)
                inside = (values >= lo) & (values <= hi)
                for r in range(values.shape[0]):
                    req.inside[r][j].append(values[r][inside[r]])
        raise Pending(name)

    def total(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """The sum over every tensor of ``value`` (any fixed shape), in float64."""
        if name in self.known:
            return self.known[name]
        if self._requests is None:
            raise RuntimeError(f"{self.key}: statistic {name!r} asked for in the merge pass but never resolved")
        req = self._requests.setdefault(name, _Request("total"))
        if self._phase == "sample":
            v = value.double()
            req.total = v if req.total is None else req.total + v
        raise Pending(name)


def _bracket(req: _Request) -> None:
    """From the sample, each row's bracket around each rank (the whole range when all was sampled)."""
    sample = torch.cat(req.samples, dim=1)
    rows, s = sample.shape
    ranks = req.ranks(req.count)
    if any(not 1 <= k <= req.count for k in ranks):
        raise ValueError(f"order statistic ranks {ranks} outside 1..{req.count}")
    req.lo = torch.full((rows, len(ranks)), -math.inf)
    req.hi = torch.full((rows, len(ranks)), math.inf)
    if s < req.count:  # sampled: bracket 6 standard deviations of the sample quantile either side
        spread = 3 / math.sqrt(s)
        for j, k in enumerate(ranks):
            q = k / req.count
            a, b = math.floor((q - spread) * s), math.ceil((q + spread) * s)
            if a >= 1:
                req.lo[:, j] = sample.kthvalue(a, dim=1).values
            if b <= s:
                req.hi[:, j] = sample.kthvalue(b, dim=1).values
    req.below = torch.zeros((rows, len(ranks)), dtype=torch.long)
    req.inside = [[[] for _ in ranks] for _ in range(rows)]
    req.samples = []


def _select(req: _Request) -> bool:
    """The exact order statistics once gathered; False (and the bracket widened) if one was missed."""
    ranks = req.ranks(req.count)
    out = torch.empty(req.lo.shape)
    missed = False
    for r in range(out.shape[0]):
        for j, k in enumerate(ranks):
            inside = torch.cat(req.inside[r][j]) if req.inside[r][j] else torch.empty(0)
            below = int(req.below[r, j])
            if below < k <= below + inside.numel():
                out[r, j] = inside.kthvalue(k - below).values
            else:  # the sample misled (about 1e-9 odds): take every entry next time
                req.lo[r, j], req.hi[r, j] = -math.inf, math.inf
                missed = True
    req.below.zero_()
    req.inside = [[[] for _ in ranks] for _ in range(out.shape[0])]
    req.result = out
    return not missed


def resolve_globals(keys: list[str], run: Callable[[str, Context], object], make_context: Callable[[str], Context],
                    sizes: dict[str, int], on_pass: Callable[[str], None] | None = None) -> dict:
    """Every whole-model statistic the method asks for, found in streaming passes.

    Args:
        keys: the floating-point parameters, in reading order.
        run: runs the method on one parameter with the given context.
        make_context: a fresh context for a parameter (seeded generator, layer).
        sizes: each key's entry count (per model), to set the sampling rate and pick a cheap probe.
        on_pass: called with a description as each pass begins.
    """
    known: dict = {}
    rate = min(1.0, SAMPLE / max(1, sum(sizes.values())))
    probe = min((k for k in keys if sizes[k] > 0), key=lambda k: sizes[k], default=None)
    passes = 0

    def sweep(phase: str, requests: dict) -> None:
        for key in keys:
            ctx = make_context(key)
            ctx.known, ctx._requests, ctx._phase, ctx._rate = known, requests, phase, rate
            try:
                run(key, ctx)
            except Pending:
                pass

    while True:
        if probe is not None:  # does the method, run on the smallest tensor, still ask for something?
            ctx = make_context(probe)
            ctx.known, ctx._requests, ctx._phase = known, {}, "probe"
            try:
                run(probe, ctx)
                return known
            except Pending:
                pass
        passes += 1
        if on_pass:
            on_pass(f"statistics pass {passes}")
        requests: dict[str, _Request] = {}
        sweep("sample", requests)
        if not requests:
            return known
        for name, req in requests.items():
            if req.kind == "total":
                known[name] = req.total
        order = {n: r for n, r in requests.items() if r.kind == "kth"}
        for req in order.values():
            _bracket(req)
        while order:
            passes += 1
            if on_pass:
                on_pass(f"statistics pass {passes}")
            sweep("gather", order)
            for n in [n for n, r in order.items() if _select(r)]:
                known[n] = order.pop(n).result
