"""Merge configs: mixtune's own YAML, and mergekit's YAML as it is.

mixtune's form::

    method: ties_paper            # `mixtune merge --list` describes each
    base_model: ./base            # required by every method except linear
    models:
      - {model: ./math, weight: 1.0}
      - {model: ./code, weight: 1.0, parameters: {density: 0.5}}   # per-model (mergekit methods)
    parameters: {density: 0.2, lambda: 1.0}
    dtype: bfloat16               # default: each tensor keeps the base's dtype
    seed: 0                       # random methods (DARE)
    max_shard_size: 5GB
    vocab: error                  # or pad / truncate when vocabulary sizes differ
    files_from: ./math            # config + tokenizer over the base's (default: the base's)

mergekit's form (recognised by its ``merge_method`` key) is read as mergekit reads it:
``merge_method``, ``base_model``, ``models[].model``, ``models[].parameters`` (``weight``,
``density``, ``gamma``), top-level ``parameters`` (method parameters, and per-model defaults such
as a shared ``density``), ``dtype``, ``out_dtype``, ``random_seed`` and ``tokenizer_source: base``.
Its method names run mergekit's variants. Not supported, and an error naming the field: slices,
per-layer gradients (list-valued parameters), other tokenizer sources, and methods outside the
task-arithmetic family and ``linear``. One difference remains by design: mixtune computes in
float32, where mergekit computes in the inputs' dtype unless ``dtype`` is set.
Paths are taken from the config's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

from mixtune.core import ConfigError, Strict, load_config
from mixtune.core.config import apply_override, validate


class ModelEntry(Strict):
    model: Path
    weight: float = 1.0
    parameters: dict = {}
    """Per-model parameters of the method besides the weight (mergekit's ``density``, ``gamma``)."""


class MergeConfig(Strict):
    """A merge recipe (see the module docstring)."""

    method: str
    base_model: Path | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict = {}
    dtype: str | None = None
    """float32, bfloat16 or float16 for floating tensors; default: as the base stores them."""
    seed: int = 0
    max_shard_size: str | int = "5GB"
    """Largest output shard: bytes, or e.g. 5GB, 500MB, 2GiB."""
    vocab: Literal["error", "pad", "truncate"] = "error"
    """When embedding and head rows differ: stop (default), pad every input with zero rows to the
    largest vocabulary (as fine-tuning transfer does), or cut them to the base's (as mergekit does)."""
    files_from: Path | None = None
    """Folder whose config and tokenizer files go beside the merged weights, over the base's
    (default: the base's; for ``transfer``, the fine-tune's)."""


MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")
_PER_MODEL = ("density", "gamma")


def from_mergekit(doc: dict, where: str = "config") -> dict:
    """mixtune's config fields for a mergekit YAML document (raises ConfigError naming the field)."""
    known = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "random_seed",
             "tokenizer_source"}
    for key in doc:
        if key not in known:
            raise ConfigError(f"{where}: mergekit field {key!r} is not supported by mixtune "
                              f"(supported: {', '.join(sorted(known))})")
    method = doc["merge_method"]
    if method not in MERGEKIT_METHODS:
        raise ConfigError(f"{where}: merge_method {method!r} is not supported by mixtune; mergekit methods it runs: "
                          f"{', '.join(MERGEKIT_METHODS)}")
    if doc.get("tokenizer_source") not in (None, "base"):
        raise ConfigError(f"{where}: tokenizer_source {doc['tokenizer_source']!r}: only 'base' is supported")

    def scalar(name: str, value, field: str):
        if isinstance(value, list | dict):
            raise ConfigError(f"{where}: {field} {name} = {value!r}: per-layer gradients and filters are not "
                              "supported; give one number")
        return value

    top = {k: scalar(k, v, "parameters") for k, v in (doc.get("parameters") or {}).items()}
    defaults = {k: top.pop(k) for k in [*_PER_MODEL, "weight"] if k in top}
    base = doc.get("base_model")
    models = []
    for i, entry in enumerate(doc.get("models") or []):
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{where}: models[{i}] needs a 'model' path")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise ConfigError(f"{where}: models[{i}] field {sorted(extra)[0]!r} is not supported")
        params = defaults | {k: scalar(k, v, f"models[{i}].parameters")
                             for k, v in (entry.get("parameters") or {}).items()}
        if method != "linear" and entry["model"] == base:
            continue  # mergekit takes the task vectors of the other models only
        if "weight" not in params:
            raise ConfigError(f"{where}: models[{i}] ({entry['model']}) has no weight (mergekit requires one)")
        models.append({"model": entry["model"], "weight": params.pop("weight"), "parameters": params})
    # mergekit cuts embeddings and heads whose vocabulary differs to the base's
    out = {"method": method, "models": models, "parameters": top, "vocab": "truncate"}
    if base is not None:
        out["base_model"] = base
    dtype = doc.get("out_dtype") or doc.get("dtype")
    if dtype is not None:
        out["dtype"] = dtype
    if doc.get("random_seed") is not None:
        out["seed"] = doc["random_seed"]
    return out


def load_merge_config(path: str | os.PathLike, overrides: dict | None = None) -> MergeConfig:
    """A merge config from YAML in either form; dotted ``overrides`` apply to mixtune's fields."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not (isinstance(doc, dict) and "merge_method" in doc):
        return load_config(MergeConfig, path, overrides)
    data = from_mergekit(doc, str(path))
    for key, value in (overrides or {}).items():
        apply_override(data, key, value)
    return validate(MergeConfig, data, where=f"{path} (read as a mergekit config)")
