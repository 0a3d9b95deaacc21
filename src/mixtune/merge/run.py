"""Merge checkpoints tensor by tensor as a :class:`~mixtune.merge.config.MergeConfig` says.

Every tensor is read as stored, merged in float32, cast and written before the next is read. A
method with ``scope: global`` first finds its whole-model statistics in streaming passes over the
inputs (:mod:`mixtune.merge.context`). Inputs are checked first: a missing tensor, a shape mismatch,
a different architecture or a NaN/Inf stops the merge with one line naming the model and the
tensor. Vocabulary sizes may differ only when the config says what to do (``vocab: pad`` pads
embedding and head rows with zeros to the largest vocabulary; ``vocab: truncate`` cuts them to the
base's). A peft LoRA adapter folder is accepted wherever a model is, applied to the base.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import ValidationError

from mixtune.core import (
    CheckpointError,
    ConfigError,
    atomic_dir,
    atomic_write_text,
    dump_config,
)
from mixtune.merge.adapter import AdapterReader, is_adapter
from mixtune.merge.config import MergeConfig
from mixtune.core.names import layer_index
from mixtune.merge.context import Context, resolve_globals, tensor_seed
from mixtune.merge.io import (
    DTYPES,
    TORCH_DTYPES,
    CheckpointReader,
    StreamingWriter,
    copy_side_files,
    parse_size,
)
from mixtune.merge.methods import MERGE_METHODS
from mixtune.merge.partials import claim, reap_stale_partials, release

VOCAB = re.compile(r"embed|lm_head|wte|word_embeddings|(^|\.)output\.weight$")
"""Names of the tensors whose first dimension is the vocabulary."""


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
    here = lambda p: p if p.is_absolute() else base_dir / p
    base = here(cfg.base_model) if cfg.base_model is not None else None
    return method, params, per_model, base, [here(m.model) for m in cfg.models]


def _architecture(folder: Path) -> tuple | None:
    try:
        c = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return c.get("model_type"), tuple(c.get("architectures") or ())


def open_inputs(base: Path | None, models: list[Path]) -> list:
    """Readers of the base (first, when there is one) and the models, labelled for error messages;
    a peft adapter folder is read as its base with the adapter applied."""
    readers = [CheckpointReader(base, label=f"base_model {base}")] if base else []
    try:
        for p in models:
            if is_adapter(p):
                if not base:
                    raise ConfigError(f"model {p} is a peft adapter: give base_model, the model it adapts")
                readers.append(AdapterReader(p, readers[0], label=f"model {p} (adapter)"))
            elif (Path(p) / "moe_lora.json").exists():
                raise CheckpointError(f"model {p}: a mixture of LoRA experts (moe_lora) has no single set of weights "
                                      "to merge")
            else:
                readers.append(CheckpointReader(p, label=f"model {p}"))
        return readers
    except Exception:
        for r in readers:
            r.close()
        raise


def check_inputs(reference, others: list, vocab: str = "error") -> dict[str, tuple[int, ...]]:
    """Same architecture, same tensor names and shapes; raises CheckpointError naming what differs.

    Returns the output shape of every tensor: the reference's, except that with ``vocab`` pad or
    truncate the vocabulary rows of embeddings and heads may differ (pad: the largest; truncate:
    the reference's).
    """
    arch = _architecture(reference.folder)
    shapes = {k: reference.shape(k) for k in reference.keys()}
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
            if a == b:
                continue
            rows_only = len(a) == len(b) >= 1 and a[1:] == b[1:] and VOCAB.search(k)
            if rows_only and vocab != "error":
                if vocab == "pad":
                    shapes[k] = (max(shapes[k][0], b[0]), *a[1:])
                continue
            hint = (" (vocabulary sizes differ: set vocab: pad or vocab: truncate to merge anyway)"
                    if rows_only else "")
            raise CheckpointError(f"{r.label}: tensor {k} has shape {list(b)}, {reference.label} has "
                                  f"{list(a)}{hint}")
    return shapes


def _fit(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` with its first dimension padded with zeros or cut to ``shape``'s."""
    if tuple(t.shape) == tuple(shape):
        return t
    if t.shape[0] > shape[0]:
        return t[: shape[0]]
    return torch.cat([t, torch.zeros((shape[0] - t.shape[0], *t.shape[1:]), dtype=t.dtype)])


def _copy_files(reference: Path, files_from: Path | None, folder: Path, shapes: dict) -> None:
    """Config and tokenizer files: the reference's, overlaid by ``files_from``'s; ``vocab_size`` set
    to the output's embedding rows when padding or truncation changed them."""
    copy_side_files(reference, folder)
    if files_from is not None and Path(files_from) != Path(reference):
        copy_side_files(Path(files_from), folder)
    config = folder / "config.json"
    rows = [shape[0] for k, shape in shapes.items() if "embed" in k and len(shape) == 2]
    if config.exists() and rows:
        c = json.loads(config.read_text())
        if c.get("vocab_size") not in (None, rows[0]):
            c["vocab_size"] = rows[0]
            atomic_write_text(config, json.dumps(c, indent=2))


def merge_tensors(method, params, per_model: list, weights: list[float], keys: list[str],
                  load: Callable[[str], list[torch.Tensor]], *, sizes: dict[str, int], has_base: bool, seed: int = 0,
                  progress: Callable[[str], None] | None = None, on_pass: Callable[[str], None] | None = None,
                  dtypes: dict[str, torch.dtype] | None = None):
    """Yields ``(key, merged tensor)`` for each of ``keys``, in order: in ``dtypes[key]`` or float32.

    ``load(key)`` gives the inputs' tensors of one parameter (base first when ``has_base``);
    ``sizes`` gives each key's entry count (per model). With ``scope: global`` the
    whole-model statistics are found first, in streaming passes over ``keys``. ``progress`` is
    called with each key as it is merged, in every pass; ``on_pass`` as each pass begins.
    """
    layers = {k: layer_index(k) for k in keys}
    num_layers = 1 + max((i for i in layers.values() if i is not None), default=-1)

    def context(key: str) -> Context:
        return Context(key=key, rng=torch.Generator().manual_seed(tensor_seed(seed, key)), per_model=per_model,
                       layer=layers[key], num_layers=num_layers, dtype=(dtypes or {}).get(key, torch.float32))

    def run(key: str, ctx: Context) -> torch.Tensor:
        tensors = load(key)
        base, models = (tensors[0], tensors[1:]) if has_base else (None, tensors)
        out = method.fn(base, models, weights, params, ctx)
        if progress is not None:
            progress(key)
        return out

    known = {}
    if getattr(params, "scope", None) == "global":
        known = resolve_globals(keys, run, context, sizes, on_pass=on_pass)
    if on_pass is not None:
        on_pass("merging")
    for key in keys:
        ctx = context(key)
        ctx.known = known
        yield key, run(key, ctx)


def merge(cfg: MergeConfig, out: str | os.PathLike, *, base_dir: Path = Path("."), overwrite: bool = False,
          progress: Callable[[str], None] | None = None, on_pass: Callable[[str], None] | None = None,
          notice: Callable[[str], None] | None = None) -> Path:
    """Merge as ``cfg`` says into the folder ``out`` (written whole or not at all).

    Partial folders of ``out`` left by interrupted merges are removed first
    (:func:`~mixtune.merge.partials.reap_stale_partials`); those of a merge still running are kept.

    Args:
        progress: optional callable given each tensor name after it is merged (in every pass).
        on_pass: optional callable given a description as each pass over the tensors begins.
        notice: optional callable given a line for each stale partial folder removed or kept
            (default: a warning on the ``mixtune.merge`` logger).
    """
    method, params, per_model, base_path, model_paths = resolve(cfg, base_dir)
    if Path(out).exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another folder, or overwrite it (--overwrite)")
    inputs = open_inputs(base_path, model_paths)
    reference = inputs[0]  # the base, or the first model for methods without one
    try:
        shapes = check_inputs(reference, inputs[1:], cfg.vocab)
        weights = [m.weight for m in cfg.models]
        # floating tensors take the requested dtype (default: as stored); integer buffers keep theirs
        dtype_of = {k: TORCH_DTYPES[reference.dtype(k)] for k in reference.keys()}
        if cfg.dtype:
            dtype_of = {k: DTYPES[cfg.dtype] if d.is_floating_point else d for k, d in dtype_of.items()}
        floating = [k for k in reference.keys() if dtype_of[k].is_floating_point]
        checked: set[str] = set()

        def load(key: str) -> list[torch.Tensor]:
            tensors = [_fit(r.get(key), shapes[key]) for r in inputs]
            if key not in checked:
                for r, t in zip(inputs, tensors):
                    # a sum is NaN/Inf when an entry is (one fast pass); isfinite confirms, since a sum can overflow
                    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
                        raise CheckpointError(f"{r.label}: tensor {key} holds NaN or Inf")
                checked.add(key)
            return tensors

        merged = merge_tensors(method, params, per_model, weights, floating, load,
                               sizes={k: math.prod(shapes[k]) for k in floating}, has_base=base_path is not None,
                               seed=cfg.seed, progress=progress, on_pass=on_pass, dtypes=dtype_of)
        plan = [(k, shapes[k], dtype_of[k]) for k in reference.keys()]
        reap_stale_partials(out, notice)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            claim(tmp, Path(out))  # so that a later merge can tell this partial from a killed one's
            writer = StreamingWriter(tmp, plan, parse_size(cfg.max_shard_size))
            for key in reference.keys():
                if dtype_of[key].is_floating_point:
                    got, tensor = next(merged)
                    assert got == key
                    writer.add(key, tensor.to(dtype_of[key]))
                else:
                    writer.add(key, reference.get(key))  # integer buffers are copied from the reference
                    if progress is not None:
                        progress(key)
            writer.finish()
            files_from = cfg.files_from and (cfg.files_from if cfg.files_from.is_absolute() else base_dir / cfg.files_from)
            if files_from is None and method.files_from:
                files_from = model_paths[method.files_from - 1]
            _copy_files(reference.folder, files_from, tmp, shapes)
            atomic_write_text(tmp / "merge.yaml", dump_config(cfg))
            release(tmp)
    finally:
        for r in inputs:
            r.close()
    return Path(out)
