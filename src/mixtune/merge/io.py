"""Streaming safetensors I/O for merging: read tensor by tensor, write sharded, atomically.

A checkpoint is a Hugging Face model folder holding ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Tensors are read one at a time from memory-mapped files and
converted to float32 for computing; nothing holds a whole model. The writer collects tensors
until a shard is full, writes it, and at the end writes the index as Hugging Face does, all in a
temporary folder that is renamed only when the merge is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mixtune.core import CheckpointError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# files copied from the base model beside the merged weights
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


class CheckpointReader:
    """Tensors of one safetensors checkpoint, by name, read lazily.

    Raises:
        CheckpointError: the folder has no safetensors weights, the index names a missing shard,
            or a file is not valid safetensors (each message names the folder and file).
    """

    def __init__(self, folder: str | os.PathLike, label: str | None = None) -> None:
        self.folder = Path(folder)
        self.label = label or str(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.label}: not a folder")
        if (self.folder / INDEX).exists():
            try:
                weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{self.label}: {INDEX} is not a safetensors index ({e})") from None
        elif (self.folder / SINGLE).exists():
            weight_map = None
        else:
            raise CheckpointError(f"{self.label}: no {SINGLE} or {INDEX} (merging reads safetensors only)")
        self._stack = ExitStack()
        self._files: dict[str, object] = {}
        self.where: dict[str, str] = {}
        names = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        for name in names:
            path = self.folder / name
            if not path.exists():
                raise CheckpointError(f"{self.label}: {INDEX} names {name}, which is missing")
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{self.label}: {name} is not a valid safetensors file ({e})") from None
            self._files[name] = handle
            for key in handle.keys():
                self.where[key] = name
        if weight_map:
            for key, name in weight_map.items():
                if self.where.get(key) != name:
                    raise CheckpointError(f"{self.label}: {INDEX} places {key} in {name}, but that file lacks it")

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def slice(self, key: str):
        return self._files[self.where[key]].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self.slice(key).get_dtype()

    def get(self, key: str) -> torch.Tensor:
        """The tensor as stored (a copy out of the memory map)."""
        if key not in self.where:
            raise CheckpointError(f"{self.label}: has no tensor {key}")
        return self._files[self.where[key]].get_tensor(key)

    def nbytes(self) -> int:
        return sum((self.folder / n).stat().st_size for n in self._files)

    def close(self) -> None:
        self._stack.close()


class ShardedWriter:
    """Writes tensors into shards of at most ``max_shard_bytes`` (one tensor may exceed it alone)."""

    def __init__(self, folder: Path, max_shard_bytes: int = 5 * 2**30) -> None:
        self.folder, self.max = Path(folder), max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._size = 0
        self._shards: list[dict[str, int]] = []  # per written shard: key -> nbytes
        self._tmp_names: list[str] = []

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._size + size > self.max:
            self._flush()
        self._pending[key] = tensor.contiguous()
        self._size += size

    def _flush(self) -> None:
        name = f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(self.folder / name), metadata={"format": "pt"})
        self._shards.append({k: v.numel() * v.element_size() for k, v in self._pending.items()})
        self._tmp_names.append(name)
        self._pending, self._size = {}, 0

    def finish(self) -> None:
        """Write the last shard; name the shards as Hugging Face does, with an index if several."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.folder / self._tmp_names[0], self.folder / SINGLE)
            return
        weight_map, total = {}, 0
        for i, (tmp, keys) in enumerate(zip(self._tmp_names, self._shards)):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            weight_map.update({k: final for k in keys})
            total += sum(keys.values())
        (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2))


def copy_side_files(src: Path, dest: Path) -> list[str]:
    """Copy config and tokenizer files from ``src``; returns the names copied."""
    copied = []
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dest / name)
            copied.append(name)
    return copied


def parse_size(text: str | int) -> int:
    """Bytes from ``5GB``, ``500MB``, ``2GiB`` or a plain integer."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * factor)
    if t.isdigit():
        return int(t)
    raise ValueError(f"size {text!r}: expected e.g. 5GB, 500MB, 2GiB or a number of bytes")
