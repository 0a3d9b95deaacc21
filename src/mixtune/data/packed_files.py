"""A streamed stage's packed rows, written block by block to files that :class:`Packed` then maps.

The plan (:func:`~mixtune.data.packing.plan_rows`) needs only the examples' lengths; rows are then
built :data:`BLOCK_TOKENS` positions at a time (:func:`~mixtune.data.packing.fill_rows`, reading
tokens from the token caches, :meth:`~mixtune.data.tokens.TokenCache.read`) and appended to one int64 file per field,
``<field>.i64`` of shape ``(rows, seq_len)``. The folder is cached (:mod:`mixtune.data.cache`) under a
key of everything the rows depend on: the examples (token stores and picks), their source ids,
``seq_len``, ``pad_id`` and ``long_examples``. :class:`Packed`'s tensors are copy-on-write maps of the
files, so training reads only the rows of each batch; they take 40 bytes per position on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mixtune.data.cache import build_once, cache_root, digest
from mixtune.data.format import Packed
from mixtune.data.packing import fill_rows, plan_rows
from mixtune.data.tokens import StageExamples

FIELDS = ("input_ids", "labels", "position_ids", "source_ids", "example_ids")
BLOCK_TOKENS = 1 << 19
"""Row positions built at once: about 50 MB of int64 arrays and their indices."""
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    """Examples packed on their own (rows never mix parts), their rows following the previous part's."""

    examples: StageExamples
    sources: np.ndarray
    """``(examples,)`` each example's source id."""
    where: Sequence[str] | None = None
    """Each example's name in errors (``file:line``)."""
    id_offset: int = 0
    """Added to ``example_ids`` of this part's rows."""


def pack_to_disk(parts: Sequence[Part], seq_len: int, *, pad_id: int, long_examples: str = "error") -> tuple[
        Packed, list[int]]:
    """The rows of ``parts`` packed one part after another (as :func:`~mixtune.data.format.pack` packs
    each), built now or found in the cache; and how many rows each part has.

    Raises:
        DataError: an example is longer than ``seq_len`` and ``long_examples`` is ``error``.
    """
    key = digest("packed", seq_len, pad_id, long_examples, [(p.examples.key, p.id_offset) for p in parts],
                 *[np.asarray(p.sources, dtype=np.int64) for p in parts])
    folder = cache_root() / "packed" / key
    meta = build_once(folder, lambda tmp: _write(parts, seq_len, pad_id, long_examples, tmp))
    return open_packed(folder, meta), meta["part_rows"]


def _write(parts: Sequence[Part], seq_len: int, pad_id: int, long_examples: str, tmp: Path) -> dict:
    plans = [plan_rows(p.examples.lengths(), p.examples.divisible(), seq_len, long_examples=long_examples,
                       where=p.where) for p in parts]  # every error is found before a row is written
    block = max(1, BLOCK_TOKENS // seq_len)
    files = {f: open(tmp / f"{f}.i64", "wb") for f in FIELDS}
    try:
        for part, plan in zip(parts, plans):
            for r0 in range(0, plan.n_rows, block):
                rows = fill_rows(plan, part.examples.gather, part.sources, r0, min(r0 + block, plan.n_rows),
                                 pad_id=pad_id, id_offset=part.id_offset)
                for f in FIELDS:
                    files[f].write(rows[f].tobytes())
            log.info(f"packed {plan.n_rows:,} rows of {seq_len} tokens")
    finally:
        for fh in files.values():
            fh.close()
    return {"rows": sum(p.n_rows for p in plans), "seq_len": seq_len, "part_rows": [p.n_rows for p in plans],
            "dropped": sum(p.dropped for p in plans), "truncated": sum(p.truncated for p in plans)}


def open_packed(folder: Path, meta: dict) -> Packed:
    """The :class:`Packed` over a cached folder's files (copy-on-write maps: writable tensors, the
    files never change)."""
    shape = (meta["rows"], meta["seq_len"])
    if not meta["rows"]:  # nothing to map
        tensors = {f: torch.zeros(shape, dtype=torch.long) for f in FIELDS}
    else:
        tensors = {f: torch.from_numpy(np.memmap(folder / f"{f}.i64", dtype=np.int64, mode="c", shape=shape))
                   for f in FIELDS}
    return Packed(**tensors, dropped=meta["dropped"], truncated=meta["truncated"])


__all__ = ["BLOCK_TOKENS", "FIELDS", "Part", "open_packed", "pack_to_disk"]
