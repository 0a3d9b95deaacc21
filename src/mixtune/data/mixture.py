"""Mixtures: how many examples to take from each source.

Tools disagree on what a "ratio" means, so mixtune names each meaning apart.
Per source, give at most one of ``count``, ``fraction`` or ``share``:

===============  ===========================================  ===================================
setting          examples taken from a source of size |D|     example (|D| = 1000)
===============  ===========================================  ===================================
(nothing)        all of it: |D|                               1000
``count: N``     exactly N                                    ``count: 250`` -> 250
``fraction: f``  floor(f * |D|)   (DMT's k is a fraction)     ``fraction: 0.125`` -> 125
``share: s``     s of the *whole mixture*; see below          ``share: 0.5``, total 600 -> 300
===============  ===========================================  ===================================

**Shares** describe the final mix: every source gets a share, the shares sum to
1 (within 1e-6; nothing is renormalised), and ``total`` sets the mixture size
T. Source i gets floor(s_i * T) examples and the remaining T - sum(floor)
examples go one each to the largest fractional parts (ties: listing order), so
the counts add up to T exactly. Without ``total``, T is the largest size no
source has to repeat for: T = min_i floor(|D_i| / s_i).
Shares cannot be mixed with counts or fractions.

**Temperature** ``temperature: t`` (no per-source amounts) sets shares
s_i = |D_i|^(1/t) / sum_j |D_j|^(1/t): t = 1 keeps natural proportions, larger t
moves towards uniform (as in multilingual temperature sampling). Then it is a
share mixture.

**Replacement.** Without replacement (default) a source cannot give more than
it has: asking for more is an error. With ``replace: true`` the N examples are
drawn independently and uniformly with replacement.

**Determinism.** Each source is sampled from its own stream seeded by
``(seed, source name)``, so adding or removing one source does not change what
is taken from another. The result is shuffled with the seed. Sampling needs only
each source's size (:func:`draw`), so a streamed source is mixed without being read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import Field, model_validator

from mixtune.core import ConfigError, Strict
from mixtune.core.seeds import rng

SHARE_TOLERANCE = 1e-6


class Take(Strict):
    """How much of one source goes into a mixture (at most one of count, fraction, share)."""

    count: int | None = Field(default=None, ge=0)
    """Exactly this many examples."""
    fraction: float | None = Field(default=None, ge=0)
    """floor(fraction x source size) examples; above 1 only with ``replace``."""
    share: float | None = Field(default=None, gt=0, le=1)
    """This share of the whole mixture (all sources then need shares summing to 1)."""
    replace: bool = False
    """Draw with replacement (allows taking more than the source has)."""

    @model_validator(mode="after")
    def _one_amount(self) -> Take:
        given = [k for k in ("count", "fraction", "share") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of count, fraction, share (got {', '.join(given)})")
        return self


class MixtureConfig(Strict):
    """A mixture of named sources."""

    sources: dict[str, Take | None]
    """Source name -> how much of it to take (empty: all of it)."""
    total: int | None = Field(default=None, ge=1)
    """Mixture size for share and temperature mixtures."""
    temperature: float | None = Field(default=None, gt=0)
    """Shares proportional to size^(1/temperature) instead of per-source amounts."""

    @model_validator(mode="after")
    def _consistent(self) -> MixtureConfig:
        if not self.sources:
            raise ValueError("a mixture needs at least one source")
        takes = [t or Take() for t in self.sources.values()]
        shares = [t.share is not None for t in takes]
        absolute = [t.count is not None or t.fraction is not None for t in takes]
        if self.temperature is not None and (any(shares) or any(absolute)):
            raise ValueError("with `temperature`, leave out per-source count/fraction/share")
        if any(shares) and not all(shares):
            missing = [n for n, s in zip(self.sources, shares) if not s]
            raise ValueError(f"shares describe the whole mix: every source needs one (missing: {', '.join(missing)})")
        if all(shares):
            total = sum(t.share for t in takes)  # type: ignore[misc]
            if abs(total - 1) > SHARE_TOLERANCE:
                listed = ", ".join(f"{n}={t.share}" for n, t in zip(self.sources, takes))
                raise ValueError(f"shares must sum to 1, got {total:.6g} ({listed}); nothing is renormalised")
        if self.total is not None and not all(shares) and self.temperature is None:
            raise ValueError("`total` applies to share or temperature mixtures; use per-source `count` otherwise")
        return self


@dataclass(frozen=True)
class Outcome:
    """What a mixture took from one source."""

    source: str
    available: int
    taken: int
    distinct: int
    """Distinct examples among those taken (lower than ``taken`` only with replacement)."""


class Picks(Sequence[tuple[str, int]]):
    """A mixture's picks as arrays: ``(source name, index in that source)`` per example, without a
    Python tuple each (a mixture of a streamed source may hold millions)."""

    def __init__(self, names: Sequence[str], source: np.ndarray, index: np.ndarray):
        self.names = tuple(names)
        self.source = source
        """``(N,)`` position of each pick's source in ``names``."""
        self.index = index
        """``(N,)`` index of each pick's record in its source."""

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        return self.names[self.source[k]], int(self.index[k])

    def tolist(self) -> list[tuple[str, int]]:
        return list(zip([self.names[s] for s in self.source.tolist()], self.index.tolist()))


class PickedRecords(Sequence[dict]):
    """The records of ``picks``, read from ``sources`` when asked for, each with its ``source`` set."""

    def __init__(self, sources: Mapping[str, Sequence[dict]], picks: Picks):
        self.sources, self.picks = sources, picks

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        name, i = self.picks[k]
        return self.sources[name][i] | {"source": name}


class PickNames(Sequence[str]):
    """Where each of ``picks`` came from (``file:line`` ...), by ``where_of(source, index)``, computed
    only when asked for (an error message names one)."""

    def __init__(self, picks: Picks, where_of: Callable[[str, int], str], positions: np.ndarray | None = None):
        self.picks, self.where_of = picks, where_of
        self.positions = np.arange(len(picks)) if positions is None else positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        return self.where_of(*self.picks[int(self.positions[k])])

    def take(self, positions: np.ndarray) -> PickNames:
        return PickNames(self.picks, self.where_of, self.positions[np.asarray(positions, dtype=np.int64)])


@dataclass(frozen=True)
class Mixture:
    """The mixed examples, each a record with its ``source`` set, and per-source outcomes."""

    records: Sequence[dict]
    """A list, or for a lazy mixture (:func:`mix` with ``lazy``) a :class:`PickedRecords`."""
    picks: Sequence[tuple[str, int]]
    """For each record, its source and index in that source (so per-source work can be shared); a
    list, or :class:`Picks` for a lazy mixture."""
    outcomes: list[Outcome]


Seed = int | Sequence[int | str]
"""A seed, or a seed and the indices of the mixture's stream (e.g. ``(seed, stage)``)."""


def _stream(seed: Seed, name: str) -> np.random.Generator:
    """Source ``name``'s stream of the mixture (:func:`mixtune.core.seeds.rng`)."""
    parts = [seed] if isinstance(seed, int) else list(seed)
    return rng(parts[0], "mixture", *parts[1:], name)


def plan_counts(cfg: MixtureConfig, sizes: Mapping[str, int]) -> dict[str, int]:
    """How many examples each source gives (the table in the module docstring).

    Raises:
        ConfigError: a source is unknown, or more is asked than a source has without replacement.
    """
    unknown = [n for n in cfg.sources if n not in sizes]
    if unknown:
        raise ConfigError(f"mixture names unknown source(s) {', '.join(unknown)}; defined: {', '.join(sizes)}")
    takes = {n: t or Take() for n, t in cfg.sources.items()}
    if cfg.temperature is not None or all(t.share is not None for t in takes.values()):
        if cfg.temperature is not None:
            weights = {n: sizes[n] ** (1 / cfg.temperature) for n in takes}
            z = sum(weights.values())
            shares = {n: w / z for n, w in weights.items()}
        else:
            shares = {n: t.share for n, t in takes.items()}  # type: ignore[misc]
        total = cfg.total
        if total is None:
            total = min(math.floor(sizes[n] / s) for n, s in shares.items() if not takes[n].replace) \
                if not all(t.replace for t in takes.values()) else None
            if total is None:
                raise ConfigError("a share mixture where every source has replace: true needs a `total`")
        counts = {n: math.floor(s * total) for n, s in shares.items()}
        order = sorted(shares, key=lambda n: -(shares[n] * total - counts[n]))  # stable: ties keep listing order
        for n in order[: total - sum(counts.values())]:
            counts[n] += 1
    else:
        counts = {}
        for n, t in takes.items():
            counts[n] = t.count if t.count is not None else (
                math.floor(t.fraction * sizes[n]) if t.fraction is not None else sizes[n])
    for n, c in counts.items():
        if c > sizes[n] and not takes[n].replace:
            raise ConfigError(
                f"mixture source {n!r}: {c} examples asked but it has {sizes[n]}; ask for fewer, "
                f"or set replace: true to repeat examples"
            )
    return counts


def draw(cfg: MixtureConfig, sizes: Mapping[str, int], *, seed: Seed = 0) -> tuple[Picks, list[Outcome]]:
    """The seeded picks of the mixture ``cfg`` from sources of the given sizes (name -> records):
    only counts are needed, never the records."""
    counts = plan_counts(cfg, sizes)
    source, index, outcomes = [], [], []
    for k, (name, count) in enumerate(counts.items()):
        size = sizes[name]
        take = cfg.sources[name] or Take()
        gen = _stream(seed, name)
        if take.replace:
            idx = gen.integers(0, size, size=count) if size else np.zeros(0, dtype=np.int64)
        else:
            idx = gen.permutation(size)[:count]
        source.append(np.full(len(idx), k, dtype=np.int32))
        index.append(idx.astype(np.int64))
        outcomes.append(Outcome(name, size, count, int(np.unique(idx).size)))
    order = _stream(seed, "\x00order").permutation(sum(len(i) for i in index))
    return Picks(list(counts), np.concatenate(source)[order], np.concatenate(index)[order]), outcomes


def mix(cfg: MixtureConfig, sources: Mapping[str, Sequence[dict]], *, seed: Seed = 0, lazy: bool = False) -> Mixture:
    """Sample the mixture ``cfg`` from loaded ``sources`` (name -> records), deterministically.

    ``seed`` may be a sequence (e.g. ``(recipe seed, stage index)``) to give each stage its own draw.
    With ``lazy``, picks stay arrays (:class:`Picks`) and records are read only when asked for
    (:class:`PickedRecords`); the picks are the same either way.
    """
    picks, outcomes = draw(cfg, {n: len(r) for n, r in sources.items()}, seed=seed)
    if lazy:
        return Mixture(PickedRecords(sources, picks), picks, outcomes)
    listed = picks.tolist()
    return Mixture([sources[n][i] | {"source": n} for n, i in listed], listed, outcomes)


__all__ = ["Mixture", "MixtureConfig", "Outcome", "PickNames", "PickedRecords", "Picks", "Take", "draw", "mix", "plan_counts"]
