"""Tokenized records as flat arrays: in memory, or cached on disk for a streamed source.

A *token store* holds ``n`` tokenized records as two flat arrays of ``ids`` and ``labels`` with
``offsets`` ``(n + 1,)`` (record i is ``ids[offsets[i]:offsets[i + 1]]``) and ``divisible`` ``(n,)``
(raw text, which packing may cut; see :class:`~mixtune.data.format.Example`). For a streamed source
(:mod:`mixtune.data.stream`) the whole file is tokenized once, about a MiB of records at a time
through :func:`~mixtune.data.format.tokenize_records` (so the ids are those of the in-memory path),
and ``ids``/``labels`` are appended to int32 files; the cache key is the source's index key and the
tokenizer's (:func:`~mixtune.data.cache.tokenizer_key`). A stage's examples are then
:class:`StageExamples`: per pick, a store and a record in it, read only when asked for.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mixtune.core import DataError
from mixtune.data.cache import build_once, cache_root, digest, tokenizer_key
from mixtune.data.format import Example, tokenize_records
from mixtune.data.mixture import Picks
from mixtune.data.packing import ranges
from mixtune.data.stream import StreamedSource

CHUNK_BYTES = 1 << 20
"""Records tokenized per call: about this many bytes of JSONL (~100 MB of Python lists and encodings)."""
log = logging.getLogger(__name__)


class TokenArrays:
    """A token store in memory (the examples of an in-memory source that a streamed stage also uses)."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, divisible: np.ndarray):
        self.ids, self.labels, self.offsets, self.divisible = ids, labels, offsets, divisible
        self.key = digest("arrays", ids, labels, offsets, divisible)

    @classmethod
    def of(cls, examples: Sequence[Example]) -> TokenArrays:
        lengths = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int64, count=len(examples))
        flat = [np.fromiter(itertools.chain.from_iterable(getattr(e, k) for e in examples), dtype=np.int64,
                            count=int(lengths.sum())) for k in ("input_ids", "labels")]
        return cls(*flat, np.concatenate([[0], np.cumsum(lengths)]),
                   np.fromiter((e.divisible for e in examples), dtype=bool, count=len(examples)))

    def read(self, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids and labels of the token ranges ``(starts[j], lengths[j])``, concatenated."""
        at = ranges(starts, lengths)
        return self.ids[at], self.labels[at]

    def example(self, i: int) -> Example:
        a, b = self.offsets[i], self.offsets[i + 1]
        return Example(self.ids[a:b].tolist(), self.labels[a:b].tolist(), bool(self.divisible[i]))


class TokenCache:
    """A token store on disk: ``ids.i32`` and ``labels.i32`` (flat int32), ``offsets.npy``, ``divisible.npy``."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = folder, key
        self.offsets = np.load(folder / "offsets.npy")
        self.divisible = np.load(folder / "divisible.npy")

    def read(self, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids and labels of the token ranges ``(starts[j], lengths[j])``, concatenated, read with
        one ``preadv`` per range and file, in file order. Not through a memory map: scattered reads
        from one fault in the pages around each range (64 KiB), which count as the process's memory
        until unmapped, so packing would hold most of the cache resident."""
        lengths = np.asarray(lengths, dtype=np.int64)
        out = np.empty(int(lengths.sum()), dtype=np.int32), np.empty(int(lengths.sum()), dtype=np.int32)
        at = (np.cumsum(lengths) - lengths).tolist()
        starts, n = np.asarray(starts, dtype=np.int64).tolist(), lengths.tolist()
        order = sorted(range(len(n)), key=starts.__getitem__)
        for name, buf in zip(("ids.i32", "labels.i32"), out):
            view = memoryview(buf).cast("B")
            fd = os.open(self.folder / name, os.O_RDONLY)
            try:
                for j in order:
                    want = 4 * n[j]
                    if want and os.preadv(fd, [view[4 * at[j]: 4 * at[j] + want]], 4 * starts[j]) != want:
                        raise DataError(f"{self.folder / name}: shorter than its offsets say; delete the folder")
            finally:
                os.close(fd)
        return out

    def example(self, i: int) -> Example:
        a, n = int(self.offsets[i]), int(self.offsets[i + 1] - self.offsets[i])
        ids, labels = (np.fromfile(self.folder / f, dtype=np.int32, count=n, offset=4 * a).tolist()
                       for f in ("ids.i32", "labels.i32"))
        return Example(ids, labels, bool(self.divisible[i]))


TokenStore = TokenArrays | TokenCache


def source_tokens(source: StreamedSource, tokenizer) -> TokenCache:
    """The tokens of every record of the streamed ``source``'s file, tokenized now or found in the cache."""
    key = digest("tokens", source.key, tokenizer_key(tokenizer))
    folder = cache_root() / "tokens" / key
    build_once(folder, lambda tmp: _tokenize(source, tokenizer, tmp))
    return TokenCache(folder, key)


def _tokenize(source: StreamedSource, tokenizer, tmp: Path) -> dict:
    index = source.index
    n = len(index)
    offsets = np.zeros(n + 1, dtype=np.int64)
    divisible = np.zeros(n, dtype=bool)
    ends = np.cumsum(index[:, 1])  # bytes of records 0..i
    with open(tmp / "ids.i32", "wb") as ids_f, open(tmp / "labels.i32", "wb") as labels_f:
        first = 0
        while first < n:
            last = max(first + 1, int(np.searchsorted(ends, ends[first] - index[first, 1] + CHUNK_BYTES, "right")))
            last = min(last, n)
            examples = tokenize_records(list(source.read_file_records(first, last - first)), tokenizer)
            arrays = TokenArrays.of(examples)
            if arrays.ids.size and max(int(arrays.ids.max()), int(arrays.labels.max())) >= 2**31:
                raise DataError(f"source {source.name!r}: token ids above 2**31 do not fit the token cache")
            ids_f.write(arrays.ids.astype(np.int32).tobytes())
            labels_f.write(arrays.labels.astype(np.int32).tobytes())
            offsets[first + 1:last + 1] = offsets[first] + arrays.offsets[1:]
            divisible[first:last] = arrays.divisible
            log.info(f"source {source.name!r}: tokenized {last:,} of {n:,} records ({offsets[last]:,} tokens)")
            first = last
    np.save(tmp / "offsets.npy", offsets)
    np.save(tmp / "divisible.npy", divisible)
    return {"records": n, "tokens": int(offsets[-1])}


class StageExamples(Sequence[Example]):
    """A stage's examples without holding them: example k is record ``local[k]`` of ``stores[store[k]]``."""

    def __init__(self, stores: list[TokenStore], store: np.ndarray, local: np.ndarray):
        self.stores, self.store, self.local = stores, store, local

    def __len__(self) -> int:
        return len(self.local)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        return self.stores[self.store[k]].example(int(self.local[k]))

    def take(self, positions: Sequence[int] | np.ndarray) -> StageExamples:
        """The examples at ``positions``, in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        return StageExamples(self.stores, self.store[positions], self.local[positions])

    def _per_store(self, field: str, dtype) -> np.ndarray:
        out = np.empty(len(self), dtype=dtype)
        for s, st in enumerate(self.stores):
            m = self.store == s
            out[m] = np.diff(st.offsets)[self.local[m]] if field == "lengths" else st.divisible[self.local[m]]
        return out

    def lengths(self) -> np.ndarray:
        return self._per_store("lengths", np.int64)

    def divisible(self) -> np.ndarray:
        return self._per_store("divisible", bool)

    @property
    def key(self) -> str:
        return digest("examples", [st.key for st in self.stores], self.store, self.local)

    def gather(self, ex: np.ndarray, start: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids and labels of pieces ``(example ex[j], tokens start[j] .. start[j]+n[j]-1)``, concatenated."""
        ids_out = np.empty(int(n.sum()), dtype=np.int64)
        labels_out = np.empty_like(ids_out)
        at = np.cumsum(n) - n  # where each piece starts in the output
        of_store = self.store[ex]
        for s, st in enumerate(self.stores):
            m = np.flatnonzero(of_store == s)
            if not m.size:
                continue
            ids, labels = st.read(st.offsets[self.local[ex[m]]] + start[m], n[m])
            dst = ranges(at[m], n[m])
            ids_out[dst] = ids
            labels_out[dst] = labels
        return ids_out, labels_out


def stage_examples(picks: Picks, sources: Mapping[str, Sequence[dict]], tokenizer,
                   cache: dict[tuple[str, int], Example]) -> StageExamples:
    """The examples of a stage's ``picks``: a streamed source's from its token cache (the whole file
    tokenized once), an in-memory source's tokenized as the in-memory path does, through ``cache``
    (``(source, index) -> Example``, shared between stages)."""
    stores: list[TokenStore] = []
    store = np.zeros(len(picks), dtype=np.int32)
    local = np.zeros(len(picks), dtype=np.int64)
    for k, name in enumerate(picks.names):
        mine = picks.source == k
        idx = picks.index[mine]
        src = sources[name]
        if isinstance(src, StreamedSource):
            stores.append(source_tokens(src, tokenizer))  # the whole file, whatever part of it this source is
            local[mine] = src.base(idx)
        else:
            distinct, local[mine] = np.unique(idx, return_inverse=True)
            todo = [(name, i) for i in distinct.tolist() if (name, i) not in cache]
            cache.update(zip(todo, tokenize_records([src[i] for _, i in todo], tokenizer)))
            stores.append(TokenArrays.of([cache[(name, i)] for i in distinct.tolist()]))
        store[mine] = len(stores) - 1
    return StageExamples(stores, store, local)


__all__ = ["CHUNK_BYTES", "StageExamples", "TokenArrays", "TokenCache", "TokenStore", "source_tokens",
           "stage_examples"]
