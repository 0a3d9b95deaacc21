"""The on-disk data cache of streamed sources: folders named by a content hash, built atomically.

Each cached thing (a JSONL index, a source's tokens, a stage's packed rows) is a folder
``$XDG_CACHE_HOME/mixtune/data/<kind>/<key>`` (default ``~/.cache``), where ``key`` hashes
everything its content depends on, so a rerun or a resumed run finds it and a change to any input
builds a new one. A folder is written under a temporary name beside its final one and renamed
when complete: a crash mid-write leaves a ``.<key>.*.partial`` folder (removed on failure when
the process survives it), never a folder under the final name. Nothing is deleted for space;
the whole cache folder may be removed at any time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mixtune.core import DataError

VERSION = 1
"""Layout and semantics of cached folders: part of every key, so a change rebuilds them."""
DONE = "meta.json"
"""Written last inside a cached folder, before the rename; its presence marks the folder complete."""


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/mixtune/data`` (``~/.cache/mixtune/data`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mixtune" / "data"


def digest(*parts: object) -> str:
    """A hex key for ``parts``: strings, numbers and None by their JSON form, numpy arrays by dtype,
    shape and bytes (so 2 million picks hash in milliseconds)."""
    h = hashlib.sha256(str(VERSION).encode())
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(f"array {p.dtype.str} {p.shape}".encode())
            h.update(np.ascontiguousarray(p).data)
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


def tokenizer_key(tokenizer) -> str:
    """What decides a tokenizer's ids for mixtune's rendering: its Rust tokenizer (vocabulary, merges,
    normalisation, special tokens, post-processing), chat template and EOS token."""
    from mixtune.models import CHAT_TEMPLATE

    return digest(type(tokenizer).__name__, tokenizer.backend_tokenizer.to_str(),
                  getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE, tokenizer.eos_token_id)


def build_once(folder: Path, build: Callable[[Path], dict]) -> dict:
    """The metadata of the cached ``folder``, building it first when absent: ``build(tmp)`` writes
    the content into an empty temporary folder and returns the metadata, saved as :data:`DONE`.
    When another process finished the same folder first, its copy is kept and this one discarded.

    Raises:
        DataError: the cache folder cannot be written (the path and the system's reason).
    """
    done = folder / DONE
    if done.exists():
        return json.loads(done.read_text())
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".partial"))
    except OSError as e:
        raise DataError(f"cannot write the data cache {folder.parent} ({e.strerror}); point XDG_CACHE_HOME at a "
                        f"writable folder") from None
    try:
        meta = build(tmp)
        (tmp / DONE).write_text(json.dumps(meta))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is as readable as other outputs
        try:
            os.rename(tmp, folder)
        except OSError:  # another process renamed its copy there first: same key, same content
            if not done.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return json.loads(done.read_text())


__all__ = ["DONE", "VERSION", "build_once", "cache_root", "digest", "tokenizer_key"]
