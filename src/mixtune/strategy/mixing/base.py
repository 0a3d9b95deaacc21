"""What a mixing mode is: typed params, a :class:`Mixer` the loop talks to, and recipe-time checks.

A stage's mixing mode decides which packed rows make each global batch and may reweight the
loss. The loop knows only the :class:`Mixer` interface: the rows of a step, whether it wants the
groups' validation losses now, :meth:`Mixer.observe` to hand them over, per-group loss weights,
and ``state_dict`` / ``load_state_dict`` for checkpoints. A stage without ``mixing`` runs the
``shuffled`` mode, so the loop has one path.

Modes other than ``shuffled`` are *grouped*: each of the stage's sources ("groups") is packed on its
own with held-out validation rows (:class:`Groups`), and batches are drawn by proportions p over
the groups (:class:`ProportionalRows`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mixtune.core import Registry, Strict
from mixtune.core.seeds import rng
from mixtune.data.format import Packed


@dataclass(frozen=True)
class Groups:
    """A grouped stage's sources: the rows of each (in the stage's packed rows) and its validation rows."""

    names: list[str]
    rows: list[torch.Tensor]
    val: list[Packed]


@dataclass(frozen=True)
class StageRows:
    """What a mode draws one stage's global batches from."""

    n_rows: int
    """Packed rows of the stage."""
    batch_size: int
    """Rows per global batch."""
    seed: int
    stage: int
    """The stage's position in the whole run (indexes every random stream)."""
    groups: Groups | None = None
    """Grouped modes: the stage's sources packed apart (None for ``shuffled``)."""


class Mixer(ABC):
    """What the loop asks a stage's mixing mode, step by step.

    Per-group arrays are in the order of ``StageRows.groups.names``. Each step the loop calls
    :meth:`wants_validation` (``after=False``) and, when it says so, :meth:`observe` with the
    groups' validation losses; then :meth:`rows`, weights the loss by :meth:`loss_weights`, takes
    the optimizer step, calls :meth:`observe_batch` when the mode has a ``reference``, and asks
    :meth:`wants_validation` (``after=True``) again. :meth:`log` goes into every log line,
    :meth:`summary` into the log at the end of the stage, :meth:`state_dict` into every checkpoint.
    """

    reference: str | None = None
    """A model folder whose per-group losses on every batch the mode wants (DoReMi's reference)."""

    @abstractmethod
    def rows(self, step: int) -> list[int]:
        """Row indices (into the stage's packed rows) of the global batch of optimizer step ``step``."""

    def wants_validation(self, step: int, *, after: bool) -> bool:
        """Whether the groups' validation losses are needed before (``after`` False) or after step ``step``."""
        return False

    def observe(self, step: int, losses: np.ndarray, *, after: bool) -> None:
        """The groups' validation losses, when :meth:`wants_validation` asked for them."""

    def observe_batch(self, step: int, losses: np.ndarray, reference: np.ndarray) -> None:
        """The step's batch: each group's mean token loss under the model and under ``reference``
        (NaN for a group without tokens in the batch)."""

    def loss_weights(self) -> np.ndarray | None:
        """Per-group loss weights w (the loss is then sum_i w_i x group i's mean token loss), or None
        for the recipe's own loss."""
        return None

    def log(self, step: int) -> dict[str, float]:
        """Entries for the log line after step ``step`` (``mix/SOURCE``: the proportions or loss weights)."""
        return {}

    def summary(self) -> dict:
        """Entries for the log at the end of the stage (e.g. Aioli's rounds); empty for none."""
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume the mode exactly (JSON-serialisable)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


@dataclass(frozen=True)
class MixingMode:
    """A registered mixing mode.

    ``mixer(params, rows) -> Mixer`` builds a stage's mixer. ``grouped``: the stage's sources are
    packed apart with ``params.validation`` held-out examples each. Optional hooks:

    - ``check(params, sources)``: raises ``ValueError`` when the params do not fit the stage's
      sources; run when the recipe is read, so ``--dry-run`` reports it;
    - ``describe(params, groups, steps) -> str``: what ``--dry-run`` prints about the mode.
    """

    params: type[Strict]
    mixer: Callable[..., Mixer]
    grouped: bool = True
    check: Callable[[Strict, list[str]], None] | None = None
    describe: Callable[[Strict, list[str], int | None], str] | None = None


MIXING_MODES: Registry[MixingMode] = Registry("mixing mode")


def register(name: str, params: type[Strict], mixer: type[Mixer], **hooks) -> MixingMode:
    """Register a mode; its citation (if any) opens the mixer's docstring."""
    return MIXING_MODES.add(name, MixingMode(params, mixer, **hooks), doc=mixer.__doc__)


def batch_counts(p: np.ndarray, batch_size: int, carry: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of each group in a batch of ``batch_size``, and the fractions carried to the next batch.

    Each group is owed carry_j + p_j B rows; it gets the floor of that, the rows left go to the
    largest remainders (ties to the earlier group), and what is still owed carries over. Over many
    steps every group gets its share of rows to within one. (The Aioli code gives floor(p_j B) and
    the last group the remainder, which at B = 8 and 3 groups turns uniform proportions into
    2, 2, 4 rows every step.)
    """
    owed = p * batch_size + (0 if carry is None else carry)
    counts = np.floor(owed + 1e-9).astype(int)
    short = batch_size - counts.sum()
    if short > 0:
        for j in np.argsort(-(owed - counts), kind="stable")[:short]:
            counts[j] += 1
    elif short < 0:  # carried debts can sum past the batch: take back from the most over-served
        for j in np.argsort(owed - counts, kind="stable")[:-short]:
            counts[j] -= 1
    return counts, owed - counts


class ProportionalRows:
    """Global batches of a grouped stage by proportions p: :func:`batch_counts` rows of each group,
    each group's rows walked through one seeded permutation per pass over them
    (stream ``mixed-batches``, stage, group name, pass)."""

    def __init__(self, rows: StageRows) -> None:
        assert rows.groups is not None, "a grouped mode needs the stage's groups"
        self.groups, self.batch_size, self.seed, self.stage = rows.groups, rows.batch_size, rows.seed, rows.stage
        self.used = [0] * len(self.groups.names)
        self.carry = np.zeros(len(self.groups.names))

    def rows(self, p: np.ndarray) -> list[int]:
        """The next batch's row indices for proportions ``p``."""
        out = []
        counts, self.carry = batch_counts(p, self.batch_size, self.carry)
        for g, count in enumerate(counts):
            pool = self.groups.rows[g]
            for _ in range(int(count)):
                epoch, i = divmod(self.used[g], len(pool))
                perm = rng(self.seed, "mixed-batches", self.stage, self.groups.names[g], epoch).permutation(len(pool))
                out.append(int(pool[perm[i]]))
                self.used[g] += 1
        return out

    def state_dict(self, mode: dict) -> dict:
        """The data positions, with the mode's own state under ``mixer``."""
        return {"used": self.used, "carry": self.carry.tolist(), "mixer": mode}

    def load_state_dict(self, state: dict) -> dict:
        """Restore the data positions; returns the mode's own state."""
        self.used, self.carry = state["used"], np.array(state["carry"])
        return state["mixer"]


class FixedProportions(Mixer):
    """A mode whose proportions ``p`` (set by the subclass) stay fixed for the whole stage."""

    p: np.ndarray

    def __init__(self, rows: StageRows) -> None:
        self.draw, self.names = ProportionalRows(rows), rows.groups.names

    def rows(self, step: int) -> list[int]:
        return self.draw.rows(self.p)

    def log(self, step: int) -> dict[str, float]:
        return shares(self.names, self.p)

    def state_dict(self) -> dict:
        return self.draw.state_dict({})

    def load_state_dict(self, state: dict) -> None:
        self.draw.load_state_dict(state)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def shares(names: list[str], values: np.ndarray) -> dict[str, float]:
    """``mix/SOURCE`` log entries."""
    return {f"mix/{g}": float(v) for g, v in zip(names, values)}
