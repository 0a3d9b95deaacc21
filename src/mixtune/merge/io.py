"""Streaming safetensors I/O for merging: read tensor by tensor, write sharded, atomically.

A checkpoint is a Hugging Face model folder holding ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Tensors are read one at a time, as stored, with ``pread`` into
fresh tensors (no memory map: resident memory is only what the merge holds); nothing holds a
whole model. The writer holds no tensor either: it writes each shard's
header first (the shapes are known in advance) and appends bytes as they come. Shards and the
index are named as Hugging Face names them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from mixtune.core import CheckpointError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# files copied from the base model beside the merged weights
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


class SafetensorsFile:
    """One safetensors file read with ``pread`` into fresh tensors: no memory map, so a merge's
    resident memory is what it allocates, not the input pages it has touched.

    Raises:
        CheckpointError: the header is not valid safetensors, an entry lies outside the file, or an
            entry's shape x dtype size differs from its byte range (each names the file and tensor).
    """

    def __init__(self, path: Path, label: str) -> None:
        self.path, self.label = path, label
        self.fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(self.fd).st_size
            n = int.from_bytes(os.pread(self.fd, 8, 0), "little") if size >= 8 else -1
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(os.pread(self.fd, n, 8))
            header.pop("__metadata__", None)
            self.start = 8 + n
            self.entries = {}
            for key, e in header.items():
                self.entries[key] = self._check(key, e, size - self.start)
        except CheckpointError:
            os.close(self.fd)
            raise
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            os.close(self.fd)
            raise CheckpointError(f"{label}: {path.name} is not a valid safetensors file ({e})") from None

    def _check(self, key: str, e: dict, data_bytes: int) -> tuple[str, tuple[int, ...], int, int]:
        """One header entry, checked by arithmetic alone: its byte range lies inside the file and
        holds exactly shape x dtype bytes (a header that lies would otherwise pass every check of
        shapes, e.g. under ``vocab: pad``, and fail only when the tensor is read)."""
        where = f"{self.label}: {self.path.name}: tensor {key}"
        kind, shape, (lo, hi) = e["dtype"], e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(f"{where}: the header says shape {shape!r}, expected a list of non-negative "
                                  "integers (the file is damaged or was written wrongly)")
        if not (type(lo) is int and type(hi) is int and 0 <= lo <= hi <= data_bytes):
            raise CheckpointError(f"{where}: data_offsets [{lo}, {hi}] lie outside the file's {data_bytes}-byte "
                                  "data section, or run backwards (the file is truncated or damaged)")
        bits = DTYPE_BITS.get(kind)
        if bits is not None and math.prod(shape) * bits != 8 * (hi - lo):
            raise CheckpointError(f"{where}: the header says shape {shape} {kind} "
                                  f"({math.prod(shape) * bits / 8:g} bytes), but its data_offsets [{lo}, {hi}] hold "
                                  f"{hi - lo} bytes (the file is damaged or was written wrongly; save the model again)")
        return kind, tuple(shape), lo, hi

    def get(self, key: str) -> torch.Tensor:
        kind, shape, lo, hi = self.entries[key]
        dtype = TORCH_DTYPES.get(kind)
        if dtype is None:
            raise CheckpointError(f"{self.label}: tensor {key} has dtype {kind}, which merging does not read")
        out = torch.empty(hi - lo, dtype=torch.uint8)
        view, done = memoryview(out.numpy()), 0
        while done < hi - lo:  # pread may return less than asked for large reads
            got = os.preadv(self.fd, [view[done:]], self.start + lo + done)
            if got <= 0:
                raise CheckpointError(f"{self.label}: {self.path.name} ends inside tensor {key}")
            done += got
        return out.view(dtype).reshape(shape)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class CheckpointReader:
    """Tensors of one safetensors checkpoint, by name, read one at a time as stored.

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
        self._files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        names = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        try:
            for name in names:
                path = self.folder / name
                if not path.exists():
                    raise CheckpointError(f"{self.label}: {INDEX} names {name}, which is missing")
                self._files[name] = SafetensorsFile(path, self.label)
                for key in self._files[name].entries:
                    self.where[key] = name
            if weight_map:
                for key, name in weight_map.items():
                    if self.where.get(key) != name:
                        raise CheckpointError(f"{self.label}: {INDEX} places {key} in {name}, but that file lacks it")
        except CheckpointError:
            self.close()
            raise

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._files[self.where[key]].entries[key][1]

    def dtype(self, key: str) -> str:
        return self._files[self.where[key]].entries[key][0]

    def get(self, key: str) -> torch.Tensor:
        """The tensor as stored, read into a new tensor."""
        if key not in self.where:
            raise CheckpointError(f"{self.label}: has no tensor {key}")
        return self._files[self.where[key]].get(key)

    def close(self) -> None:
        for f in self._files.values():
            f.close()


DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "C64": 64,
              "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
"""Bits per entry of every safetensors dtype (the format's spec); a dtype not listed is not size-checked."""
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}


class StreamingWriter:
    """Writes safetensors shards tensor by tensor, holding none of them in memory.

    Output shapes and dtypes are known before merging (they are the base's), so every shard's
    header, with all offsets, is written first and each tensor's bytes are appended as it is
    produced, in plan order. Shards hold at most ``max_shard_bytes`` (one tensor may exceed it
    alone) and are named as Hugging Face names them, with an index when there are several.
    """

    def __init__(self, folder: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 5 * 2**30) -> None:
        self.folder = Path(folder)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for key, shape, dtype in plan:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((key, tuple(shape), dtype, n))
            size += n
        count = len(shards)
        self.names = [SINGLE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.shards = shards
        self.order = [(i, entry) for i, shard in enumerate(shards) for entry in shard]
        self.next = 0
        self._file = None
        self._open_shard = -1

    def _header(self, shard: list) -> bytes:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, shape, dtype, n in shard:
            header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        return len(text).to_bytes(8, "little") + text

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the plan (its name, shape and dtype must be the planned ones)."""
        if self.next >= len(self.order):
            raise CheckpointError(f"writer: {key} is beyond the planned {len(self.order)} tensors")
        shard_index, (want, shape, dtype, n) = self.order[self.next]
        if key != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise CheckpointError(f"writer: expected {want} {list(shape)} {dtype}, got {key} "
                                  f"{list(tensor.shape)} {tensor.dtype}")
        if shard_index != self._open_shard:
            if self._file:
                self._file.close()
            self._file = open(self.folder / self.names[shard_index], "wb")  # noqa: SIM115 - closed in finish
            self._file.write(self._header(self.shards[shard_index]))
            self._open_shard = shard_index
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self.next += 1

    def finish(self) -> None:
        """Close the last shard and write the index when there are several."""
        if self._file:
            self._file.close()
        if self.next != len(self.order):
            raise CheckpointError(f"writer: {len(self.order) - self.next} planned tensors were never written")
        if len(self.names) > 1:
            weight_map = {key: self.names[i] for i, (key, *_rest) in self.order}
            total = sum(entry[3] for _, entry in self.order)
            (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                         "weight_map": weight_map}, indent=2))


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
