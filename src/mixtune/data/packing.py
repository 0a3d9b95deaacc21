"""Best-fit-decreasing packing over integer arrays: the one placement both packers use.

:func:`mixtune.data.format.pack` (rows in memory) and :mod:`mixtune.data.packed_files` (rows
written to memory-mapped files) differ only in where tokens come from and where rows go; both
plan with :func:`plan_rows` and build rows with :func:`fill_rows`, so their rows are the same
bitwise. The plan needs only each example's length, never its tokens.

A plan cuts every raw-text (``divisible``) example longer than a row into ``seq_len`` pieces,
applies ``long_examples`` to the others, then places pieces longest first (ties: first piece
first), each into the fullest row it still fits; within a row, pieces sit in the order they were
placed. See :mod:`mixtune.data.format` for what a row holds.
"""

from __future__ import annotations

import array
import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mixtune.core import DataError

IGNORE = -100
CHUNK = 1 << 16  # pieces placed per Python-level batch: bounds the Python ints alive at once

Gather = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""``(example, start, length)`` per piece -> the pieces' token ids and labels, concatenated."""


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concat(arange(s, s + n) for s, n in zip(starts, lengths))``, without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    before = np.cumsum(lengths) - lengths  # tokens ahead of each range
    return np.repeat(np.asarray(starts, dtype=np.int64) - before, lengths) + np.arange(int(lengths.sum()))


@dataclass(frozen=True)
class RowPlan:
    """Where every placed piece goes. Arrays are ``(pieces,)``, sorted by (row, column)."""

    seq_len: int
    n_rows: int
    example: np.ndarray
    """Index of the piece's example."""
    start: np.ndarray
    """First token of the piece within its example."""
    length: np.ndarray
    row: np.ndarray
    col: np.ndarray
    """Column of the piece's first token in its row."""
    dropped: int
    truncated: int


def plan_rows(lengths: np.ndarray, divisible: np.ndarray, seq_len: int, *, long_examples: str = "error",
              where: Sequence[str] | None = None) -> RowPlan:
    """Cut, check and place examples of the given token ``lengths`` into rows of ``seq_len``.

    Raises:
        DataError: an example is longer than ``seq_len`` and ``long_examples`` is ``error``
            (named by ``where[i]``, else ``example i+1``).
    """
    # Arrays are (pieces,) and int32 where values allow: a plan of millions of pieces stays ~50 MB.
    lengths = np.asarray(lengths, dtype=np.int64)
    divisible = np.asarray(divisible, dtype=bool)
    count = np.where(divisible & (lengths > seq_len), -(-lengths // seq_len), 1)  # pieces per example
    example = np.repeat(np.arange(len(lengths), dtype=np.int32), count)
    start = ((np.arange(len(example)) - np.repeat(np.cumsum(count) - count, count)) * seq_len).astype(np.int32)
    rest = lengths[example] - start
    n = np.where(divisible[example], np.minimum(seq_len, rest), rest)
    del rest, count
    long = np.flatnonzero(n > seq_len)  # only undivisible examples can be
    dropped = truncated = 0
    if long.size:
        if long_examples == "error":
            i = int(example[long[0]])
            name = where[i] if where else f"example {i + 1}"
            raise DataError(f"{name} has {int(n[long[0]])} tokens, longer than seq_len = {seq_len}. Raise "
                            f"format.seq_len, or set format.long_examples to 'drop' or 'truncate'")
        if long_examples == "drop":
            dropped, n[long] = long.size, 0
        else:
            truncated, n[long] = long.size, seq_len
    n = n.astype(np.int32)  # every piece now fits a row

    # Best fit decreasing. Rows are grouped by remaining space; `spaces` keeps the distinct
    # remaining sizes sorted, so the best row is one bisect away (at most seq_len+1 keys).
    order = np.argsort(-n, kind="stable")  # longest first, ties in piece order
    order = order[: int(np.count_nonzero(n))]  # zero-length pieces (dropped, empty) are not placed
    row = np.empty(len(order), dtype=np.int32)
    col = np.empty(len(order), dtype=np.int32)
    by_space: dict[int, array.array] = {}  # rows by space left; arrays: 8 bytes a row, not a Python int
    spaces: list[int] = []
    n_rows = 0
    for lo in range(0, len(order), CHUNK):
        rows_, cols_ = [], []
        for size in n[order[lo:lo + CHUNK]].tolist():
            k = bisect.bisect_left(spaces, size)
            if k == len(spaces):
                r, space = n_rows, seq_len
                n_rows += 1
            else:
                space = spaces[k]
                r = by_space[space].pop()
                if not by_space[space]:
                    del by_space[space]
                    spaces.pop(k)
            rows_.append(r)
            cols_.append(seq_len - space)  # the row so far holds seq_len - space tokens
            left = space - size
            if left > 0:
                if left not in by_space:
                    by_space[left] = array.array("q")
                    bisect.insort(spaces, left)
                by_space[left].append(r)
        row[lo:lo + CHUNK] = rows_
        col[lo:lo + CHUNK] = cols_
    del by_space, spaces
    placed = np.lexsort((col, row))
    sel = order[placed]
    del order
    return RowPlan(seq_len, n_rows, example[sel], start[sel], n[sel], row[placed], col[placed], dropped, truncated)


def fill_rows(plan: RowPlan, gather: Gather, sources: np.ndarray, r0: int, r1: int, *, pad_id: int,
              id_offset: int = 0) -> dict[str, np.ndarray]:
    """Rows ``r0 .. r1-1`` of ``plan`` as int64 arrays ``(r1 - r0, seq_len)``: ``input_ids``,
    ``labels``, ``position_ids``, ``source_ids`` (``sources[example]``) and ``example_ids``
    (example + ``id_offset``); padding is ``pad_id`` / -100 / its own positions from 0 / -1 / -1."""
    seq = plan.seq_len
    lo, hi = np.searchsorted(plan.row, [r0, r1])
    ex, start, n, row, col = (a[lo:hi].astype(np.int64) for a in (plan.example, plan.start, plan.length, plan.row, plan.col))
    row -= r0
    piece = np.repeat(np.arange(len(n)), n)  # (tokens,) the piece of each token
    within = ranges(np.zeros(len(n), dtype=np.int64), n)  # (tokens,) position inside its piece
    dest = (row * seq + col)[piece] + within  # (tokens,) flat position in the block
    ids, labels = gather(ex, start, n)
    shape = (r1 - r0, seq)
    out = {"input_ids": np.full(shape, pad_id, dtype=np.int64), "labels": np.full(shape, IGNORE, dtype=np.int64)}
    out["input_ids"].flat[dest] = ids
    out["labels"].flat[dest] = labels
    out["labels"].flat[row * seq + col] = IGNORE  # never predict across the boundary with the previous piece
    used = np.bincount(row, weights=n, minlength=shape[0]).astype(np.int64)  # (rows,) real tokens per row
    out["position_ids"] = np.arange(seq, dtype=np.int64)[None, :] - used[:, None]  # padding: its own block from 0
    out["position_ids"].flat[dest] = within
    out["source_ids"] = np.full(shape, -1, dtype=np.int64)
    out["source_ids"].flat[dest] = np.asarray(sources, dtype=np.int64)[ex][piece]
    out["example_ids"] = np.full(shape, -1, dtype=np.int64)
    out["example_ids"].flat[dest] = (ex + id_offset)[piece]
    return out


__all__ = ["IGNORE", "RowPlan", "fill_rows", "plan_rows", "ranges"]
