"""What each output tensor is made of: the input tensors, their settings, the layer fraction.

A ``models:`` config merges every tensor of the base (or first model) with the same-named tensor
of each input. A ``slices:`` config builds the output layer by layer, as mergekit's planner does
(mergekit/plan.py:246-335): the embeddings come from the first slice's sources, then each slice
contributes its sources' layer ranges in order (output layer j from each source's layer
start + offset, renamed to j), then the final norm and head come from the last slice's sources.
mixtune tells embeddings from the other tensors outside the layers by name (:data:`PRE`), where
mergekit reads its architecture tables; for the architectures those tables cover the two agree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mixtune.core import CheckpointError, ConfigError
from mixtune.core.names import LAYER, layer_index
from mixtune.merge.settings import layer_fraction

PRE = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|tok_embeddings")
"""Tensors outside the layers that come before them (embeddings): taken with the first slice;
every other tensor outside the layers (final norm, head) comes with the last."""


@dataclass(frozen=True)
class Input:
    """One input tensor of an output tensor."""

    reader: int
    """Index of the checkpoint it is read from."""
    key: str
    """Its name in that checkpoint."""
    own: dict = field(default_factory=dict)
    """The input's own parameter settings (its weight under ``weight``); empty for a base."""
    is_base: bool = False


@dataclass(frozen=True)
class OutTensor:
    """One output tensor: its name, its inputs (the base first when there is one), mergekit's
    layer fraction t for gradients, and the index of the slice whose settings apply (None outside
    slices)."""

    key: str
    inputs: tuple[Input, ...]
    t: float = 0.0
    slice: int | None = None

    @property
    def has_base(self) -> bool:
        return bool(self.inputs) and self.inputs[0].is_base


def own_settings(entry) -> dict:
    """A model entry's or slice source's own settings, its weight included when given."""
    return dict(entry.parameters) | ({"weight": entry.weight} if entry.weight is not None else {})


def with_layer(key: str, index: int) -> str:
    """``key`` with its block index replaced by ``index`` (``model.layers.3.mlp`` -> ``model.layers.7.mlp``)."""
    m = LAYER.search(key)
    return key[: m.start(1)] + str(index) + key[m.end(1):]


def plan_models(cfg, keys: list[str], base: bool) -> list[OutTensor]:
    """The plan of a ``models:`` config: reader 0 is the base when ``base`` (a method that takes one
    and a base given), the models follow; every tensor merges the same-named tensors."""
    layers = {k: layer_index(k) for k in keys}
    count = 1 + max((i for i in layers.values() if i is not None), default=-1)
    first = 1 if base else 0
    owns = [own_settings(m) for m in cfg.models]
    out = []
    for k in keys:
        inputs = ((Input(0, k, is_base=True),) if base else ()) + tuple(
            Input(first + i, k, own) for i, own in enumerate(owns))
        out.append(OutTensor(k, inputs, layer_fraction(layers[k], count)))
    return out


def normpath(p: Path) -> Path:
    return Path(os.path.normpath(p))


def plan_slices(cfg, method, readers: list, index_of: dict[Path, int], here) -> tuple[list[OutTensor], int]:
    """The plan of a ``slices:`` config and its number of output layers.

    Args:
        readers: the opened checkpoints; ``index_of`` maps each model's path (``here``-resolved,
            normalised) to its reader.
        here: resolves a config path against the config's folder.

    Raises:
        ConfigError: a layer range outside its model, sources of unequal lengths, a slice without
            its base, or a number of models the method does not take (each names the slice).
        CheckpointError: a source lacks a tensor the slice needs.
    """
    takes_base = method.needs_base or method.optional_base
    block_keys: dict[int, dict[int, list[str]]] = {}

    def blocks(r: int) -> dict[int, list[str]]:
        if r not in block_keys:
            found: dict[int, list[str]] = {}
            for k in readers[r].keys():
                if (i := layer_index(k)) is not None:
                    found.setdefault(i, []).append(k)
            block_keys[r] = found
        return block_keys[r]

    def reader_of(src) -> int:
        return index_of[normpath(here(src.model))]

    for s, sl in enumerate(cfg.slices):
        lengths = []
        for j, src in enumerate(sl.sources):
            start, stop = src.layer_range
            have = 1 + max(blocks(reader_of(src)), default=-1)
            if not 0 <= start <= stop <= have:
                raise ConfigError(f"slices[{s}].sources[{j}].layer_range {[start, stop]}: {src.model} has layers "
                                  f"0..{have - 1} (a range is [start, end), end excluded)")
            lengths.append(stop - start)
        if len(set(lengths)) > 1:
            raise ConfigError(f"slices[{s}]: its sources span {lengths} layers; every source of a slice must span "
                              "as many")

    def inputs(s: int, key_of) -> tuple[Input, ...]:
        sl = cfg.slices[s]
        base = sl.base_model or cfg.base_model
        base = normpath(here(base)) if base is not None and takes_base else None
        base_in, others = None, []
        for j, src in enumerate(sl.sources):
            r, key = reader_of(src), key_of(src)
            if key not in readers[r]:
                raise CheckpointError(f"{readers[r].label}: lacks tensor {key} that slices[{s}] takes from it")
            if base is not None and normpath(here(src.model)) == base and base_in is None:
                base_in = Input(r, key, is_base=True)
            else:
                others.append(Input(r, key, own_settings(src)))
        if method.needs_base and base_in is None:
            raise ConfigError(f"slices[{s}]: its base model {sl.base_model or cfg.base_model} is not among its sources "
                              f"(list it there, with the slice's layer range, as mergekit requires)")
        low, high = method.n_models
        if len(others) < low or (high is not None and len(others) > high):
            want = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise ConfigError(f"slices[{s}]: {cfg.method} merges {want} model(s) besides the base; the slice has "
                              f"{len(others)}")
        return ((base_in,) if base_in else ()) + tuple(others)

    first, last = cfg.slices[0], cfg.slices[-1]
    outside = lambda src: [k for k in readers[reader_of(src)].keys() if layer_index(k) is None]
    plan = [OutTensor(k, inputs(0, lambda src, k=k: k), 0.0, 0) for k in outside(first.sources[0]) if PRE.search(k)]
    layer = 0
    for s, sl in enumerate(cfg.slices):
        lead = sl.sources[0]
        n = lead.layer_range[1] - lead.layer_range[0]
        for offset in range(n):
            for k in blocks(reader_of(lead))[lead.layer_range[0] + offset]:
                ins = inputs(s, lambda src, k=k: with_layer(k, src.layer_range[0] + offset))
                plan.append(OutTensor(with_layer(k, layer), ins, layer_fraction(offset, n), s))
            layer += 1
    end = len(cfg.slices) - 1
    plan += [OutTensor(k, inputs(end, lambda src, k=k: k), 0.0, end) for k in outside(last.sources[0])
             if not PRE.search(k)]
    return plan, layer
