"""Streamed sources (``stream: true``): a JSONL file indexed by the byte offsets of its records.

One pass over the file reads every line as :func:`~mixtune.data.sources.load_source` does and
checks every record the same way (the same errors, naming file:line), keeping only each kept
record's byte offset, byte length and line number: 24 bytes a record, not the record. The index is
cached (:mod:`mixtune.data.cache`) by the file's resolved path, size and modification time and the
source settings that shape records, so a second run does not read the file to start. A record is
parsed again from its bytes when asked for; sizes, subsets and picks need only the index.
"""

from __future__ import annotations

import array
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from mixtune.core import DataError
from mixtune.data.cache import build_once, cache_root, digest
from mixtune.data.sources import (SourceConfig, accept_record, check_kept, is_text_record, jsonl_lines,
                                  normalise_record, parse_line)

log = logging.getLogger(__name__)


class StreamedSource(Sequence[dict]):
    """The records of a JSONL source, read on demand; optionally a subset of them (``rows``)."""

    def __init__(self, name: str, cfg: SourceConfig, path: Path, index: np.ndarray, key: str,
                 rows: np.ndarray | None = None):
        self.name, self.cfg, self.path, self.key = name, cfg, path, key
        self.index = index
        """``(records, 3)`` int64: byte offset, byte length and line number of every record of the file."""
        self.rows = rows
        """Indices into ``index`` of the records this source holds (None: all of them)."""

    def __len__(self) -> int:
        return len(self.index) if self.rows is None else len(self.rows)

    def base(self, i):
        """Index (or indices) in the whole file of record(s) ``i`` of this source."""
        return i if self.rows is None else self.rows[i]

    def subset(self, keep: np.ndarray) -> StreamedSource:
        """The records at positions ``keep`` of this source (sorted positions keep file order)."""
        return StreamedSource(self.name, self.cfg, self.path, self.index, self.key,
                              np.asarray(self.base(np.asarray(keep, dtype=np.int64))))

    def where(self, i: int) -> str:
        """``file:line`` of record ``i``."""
        return f"{self.path}:{int(self.index[self.base(i), 2])}"

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} of a source of {len(self)}")
        return next(self.read_file_records(int(self.base(i % len(self))), 1))

    def read_file_records(self, first: int, count: int) -> Iterator[dict]:
        """Records ``first .. first+count-1`` of the whole file, normalised, read in one sequential pass."""
        offset, length, _ = self.index[first + count - 1]
        start = int(self.index[first, 0])
        with self.path.open("rb") as f:
            f.seek(start)
            data = f.read(int(offset + length) - start)
        for off, n, line in self.index[first:first + count].tolist():
            text = data[off - start: off - start + n].decode("utf-8")
            yield self._record(parse_line(text, self.path, line), f"{self.path}:{line}")

    def _record(self, obj, at: str) -> dict:
        record = normalise_record(obj, at, default_ability=self.cfg.ability or self.name, system=self.cfg.system)
        return record | {"condition": self.cfg.condition} if self.cfg.condition else record


def open_streamed(name: str, cfg: SourceConfig, base_dir: str | Path = ".") -> StreamedSource:
    """The streamed source ``name``, its index built in one pass or found in the cache.

    Raises:
        DataError: as :func:`~mixtune.data.sources.load_source` would, for the first record that does
            not fit (file:line), an empty file, or raw text in a source with a ``condition``.
    """
    path = Path(cfg.path)  # type: ignore[arg-type]
    if not path.is_absolute():
        path = Path(base_dir) / path
    if not path.is_file():
        raise DataError(f"source {name!r}: {path}: no such file")
    stat = path.stat()
    shaping = cfg.model_dump(include={"ability", "system", "condition", "empty_turns", "max_record_bytes"})
    key = digest("index", str(path.resolve()), stat.st_size, stat.st_mtime_ns, name, shaping)
    folder = cache_root() / "index" / key
    meta = build_once(folder, lambda tmp: _index(name, cfg, path, tmp))
    if meta["warning"]:
        log.warning(meta["warning"])
    return StreamedSource(name, cfg, path, np.load(folder / "index.npy"), key)


def _index(name: str, cfg: SourceConfig, path: Path, tmp: Path) -> dict:
    """Check every record of ``path`` and write the index of those kept to ``tmp/index.npy``."""
    spans = array.array("q")  # offset, length, line of each kept record: 24 bytes, no Python objects
    read, dropped, first_dropped, text = 0, 0, None, None
    for lineno, offset, length, line in jsonl_lines(path, name, cfg.max_record_bytes):
        read += 1
        at = f"{path}:{lineno}"
        record = accept_record(parse_line(line, path, lineno), at, name, cfg, measured=True)
        if record is None:
            dropped, first_dropped = dropped + 1, first_dropped or at
            continue
        if text is None and cfg.condition and is_text_record(record):
            text = at
        spans.extend((offset, length, lineno))
    warning = check_kept(name, path, len(spans) // 3, read, dropped, first_dropped)
    if text is not None:
        raise DataError(f"{text}: a raw-text record in source {name!r}, which sets condition {cfg.condition!r}; a "
                        f"C-RLFT tag opens conversation turns, so keep raw text in a source of its own")
    np.save(tmp / "index.npy", np.frombuffer(spans, dtype=np.int64).reshape(-1, 3))
    return {"records": len(spans) // 3, "warning": warning}


__all__ = ["StreamedSource", "open_streamed"]
