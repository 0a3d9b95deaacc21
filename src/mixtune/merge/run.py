"""Merge checkpoints tensor by tensor as a :class:`~mixtune.merge.config.MergeConfig` says.

Every tensor is read as stored, merged in float32, cast and written before the next is read. Inputs are
checked first: a missing tensor, a shape mismatch (vocabulary sizes included: mixtune neither
pads nor truncates), a different architecture or a NaN/Inf stops the merge with one line naming
the model and the tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from pydantic import ValidationError

from mixtune.core import CheckpointError, ConfigError, atomic_dir, atomic_write_text, dump_config
from mixtune.merge.config import MergeConfig
from mixtune.merge.io import DTYPES, TORCH_DTYPES, CheckpointReader, StreamingWriter, copy_side_files, parse_size
from mixtune.merge.methods import MERGE_METHODS


def _explain(e: Exception) -> str:
    """One line per pydantic problem: the field, what is wrong, the value given."""
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']} (got {err.get('input')!r})"
                         for err in e.errors())
    return str(e)


def resolve(cfg: MergeConfig, base_dir: Path = Path(".")):
    """The method, its validated parameters and the resolved paths; errors name the field."""
    method = MERGE_METHODS.get(cfg.method)
    try:
        params = method.params.model_validate(cfg.parameters)
    except Exception as e:
        raise ConfigError(f"parameters for {cfg.method}: {_explain(e)}") from None
    per_model = []
    for i, m in enumerate(cfg.models):
        try:
            per_model.append(method.model_params.model_validate(m.parameters))
        except Exception as e:
            raise ConfigError(f"models[{i}] ({m.model}) parameters for {cfg.method}: {_explain(e)}") from None
    if method.needs_base and cfg.base_model is None:
        raise ConfigError(f"method {cfg.method} needs base_model (the model the task vectors are taken from)")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype {cfg.dtype!r}: expected one of {', '.join(DTYPES)}")
    parse_size(cfg.max_shard_size)
    here = lambda p: p if p.is_absolute() else base_dir / p  # noqa: E731
    base = here(cfg.base_model) if cfg.base_model is not None else None
    return method, params, per_model, base, [here(m.model) for m in cfg.models]


def _seed(seed: int, key: str) -> int:
    """A generator seed per tensor, so results do not depend on the order tensors are read in."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{key}".encode()).digest()[:7], "big")


def _architecture(folder: Path) -> tuple | None:
    try:
        c = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return c.get("model_type"), tuple(c.get("architectures") or ())


def open_inputs(base: Path | None, models: list[Path]) -> list[CheckpointReader]:
    """Readers of the base (first, when there is one) and the models, labelled for error messages."""
    readers = [CheckpointReader(base, label=f"base_model {base}")] if base else []
    try:
        return readers + [CheckpointReader(p, label=f"model {p}") for p in models]
    except Exception:
        for r in readers:
            r.close()
        raise


def check_inputs(reference: CheckpointReader, others: list[CheckpointReader]) -> None:
    """Same architecture, same tensor names and shapes; raises CheckpointError naming what differs."""
    arch = _architecture(reference.folder)
    for r in others:
        other = _architecture(r.folder)
        if arch and other and arch != other:
            raise CheckpointError(f"{r.label}: architecture {other} differs from {reference.label}'s {arch}")
        missing = [k for k in reference.keys() if k not in r]
        if missing:
            raise CheckpointError(f"{r.label}: lacks tensor {missing[0]} (and {len(missing) - 1} more) "
                                  f"that {reference.label} has")
        extra = [k for k in r.keys() if k not in reference]
        if extra:
            raise CheckpointError(f"{r.label}: has tensor {extra[0]} that {reference.label} lacks")
        for k in reference.keys():
            a, b = reference.shape(k), r.shape(k)
            if a != b:
                hint = (" (vocabulary sizes differ; mixtune neither pads nor truncates embeddings)"
                        if "embed" in k or "lm_head" in k else "")
                raise CheckpointError(f"{r.label}: tensor {k} has shape {list(b)}, {reference.label} has "
                                      f"{list(a)}{hint}")


def merge(cfg: MergeConfig, out: str | os.PathLike, *, base_dir: Path = Path("."), overwrite: bool = False,
          progress=None) -> Path:
    """Merge as ``cfg`` says into the folder ``out`` (written whole or not at all).

    Args:
        progress: optional callable given each tensor name after it is written.
    """
    method, params, per_model, base_path, model_paths = resolve(cfg, base_dir)
    if Path(out).exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another folder, or overwrite it (--overwrite)")
    inputs = open_inputs(base_path, model_paths)
    reference = inputs[0]  # the base, or the first model for methods without one
    try:
        check_inputs(reference, inputs[1:])
        weights = [m.weight for m in cfg.models]
        # floating tensors take the requested dtype (default: as stored); integer buffers keep theirs
        dtype_of = {k: TORCH_DTYPES[reference.dtype(k)] for k in reference.keys()}
        if cfg.dtype:
            dtype_of = {k: DTYPES[cfg.dtype] if d.is_floating_point else d for k, d in dtype_of.items()}
        plan = [(k, reference.shape(k), dtype_of[k]) for k in reference.keys()]
        with atomic_dir(out, overwrite=overwrite) as tmp:
            writer = StreamingWriter(tmp, plan, parse_size(cfg.max_shard_size))
            for key in reference.keys():
                stored = reference.get(key)
                if stored.is_floating_point():
                    tensors = [stored if r is reference else r.get(key) for r in inputs]
                    for r, t in zip(inputs, tensors):
                        if not torch.isfinite(t).all():
                            raise CheckpointError(f"{r.label}: tensor {key} holds NaN or Inf")
                    gen = torch.Generator().manual_seed(_seed(cfg.seed, key))
                    merged = method.fn(tensors[0] if base_path else None, tensors[1:] if base_path else tensors,
                                       weights, params, gen, per_model)
                    writer.add(key, merged.to(dtype_of[key]))
                else:
                    writer.add(key, stored)  # integer buffers are copied from the reference
                if progress is not None:
                    progress(key)
            writer.finish()
            copy_side_files(reference.folder, tmp)
            atomic_write_text(tmp / "merge.yaml", dump_config(cfg))
    finally:
        for r in inputs:
            r.close()
    return Path(out)
