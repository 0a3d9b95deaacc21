"""Merge configs: mixtune's own YAML, and mergekit's YAML as it is.

mixtune's form::

    method: ties_paper            # `mixtune merge --list` describes each
    base_model: ./base            # required by every method except linear, passthrough, nuslerp
    models:
      - {model: ./math, weight: 1.0}
      - {model: ./code, weight: 1.0, parameters: {density: 0.5}}   # per-model (mergekit methods)
    parameters: {density: 0.2, lambda: 1.0}
    dtype: bfloat16               # mergekit methods compute in it; paper methods write it
    out_dtype: bfloat16           # the dtype written (default: dtype)
    seed: 0                       # random methods (DARE)
    max_shard_size: 5GB
    vocab: error                  # or pad / truncate (by row) when vocabulary sizes differ
    tokenizer: {source: union}    # or align them by token string, as mergekit does (see below)
    files_from: ./math            # config + tokenizer over the base's (default: the base's)

or, instead of ``models``, ``slices`` (a frankenmerge, or a merge of layer ranges)::

    slices:
      - sources: [{model: ./a, layer_range: [0, 24]}]
      - sources: [{model: ./b, layer_range: [8, 32]}]

mergekit's form (recognised by its ``merge_method`` key) is read as mergekit reads it:
``merge_method``, ``base_model``, ``models[].model``, ``models[].parameters``, ``slices[].sources[]``
(``model``, ``layer_range``, ``parameters``), ``slices[].base_model``, ``slices[].parameters``,
top-level ``parameters`` (method parameters, and per-model defaults such as a shared ``density``),
``dtype``, ``out_dtype``, ``random_seed``, ``tokenizer_source`` (read as ``tokenizer: {source: ...}``),
``tokenizer`` and ``chat_template``. Parameters of mergekit's methods may be gradients and filter
lists (:mod:`mixtune.merge.settings`). Not supported, and an error naming the field: ``modules``
and methods mixtune does not have. Paths are taken from the config's folder.

Vocabularies: with ``tokenizer`` the embedding and head rows are aligned by token string and the
tokenizer is built as mergekit builds it (:mod:`mixtune.merge.vocab`); without it, vocabulary sizes
must match unless ``vocab`` says to pad or cut by row (mixtune's own; mergekit has no such field and
stops, so a mergekit config without a tokenizer field stops too)::

    tokenizer:
      source: union               # base, union, or a model's folder (its tokenizer as it is)
      tokens:                     # optional rules for single tokens (added when missing)
        "<|im_start|>": {source: ./math}                                   # that model's row
        "<|im_end|>": {source: {kind: model_token, model: ./math, token: "</s>"}, force: true}
        "<pad>": {source: {kind: zero}}
      pad_to_multiple_of: 64
    chat_template: chatml         # auto, a name (chat_templates.CHAT_TEMPLATES) or a Jinja string
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from mixtune.core import ConfigError, Strict, load_config
from mixtune.core.config import apply_override, validate



class ModelEntry(Strict):
    model: Path
    weight: float | list | dict | None = None
    """This model's weight, or a gradient / filter list (mergekit methods); null: ``parameters.weight``
    at the top level, else 1."""
    parameters: dict[str, Any] = {}
    """Per-model parameters of the method besides the weight (mergekit's ``density``, ``gamma``)."""


class SliceSource(Strict):
    model: Path
    layer_range: tuple[int, int]
    """Layers [start, end) of this model (0-based, end excluded, as mergekit)."""
    weight: float | list | dict | None = None
    """As ``models[].weight``; null: the slice's, then the top level's ``parameters.weight``, else 1."""
    parameters: dict[str, Any] = {}
    """Per-model parameters for this source (over the slice's and the top level's)."""


class SliceEntry(Strict):
    sources: list[SliceSource] = Field(min_length=1)
    """The models whose layer ranges (all of one length) are merged into this slice's layers; the
    base, for methods that take one, is among them."""
    base_model: Path | None = None
    """This slice's base (default: the top-level ``base_model``)."""
    parameters: dict[str, Any] = {}
    """Parameters for this slice's tensors, over the top level's."""


class ZeroRow(Strict):
    """A row of zeros (mergekit's ``{kind: zero}``)."""

    kind: Literal["zero"]
    """``zero``."""


class ModelTokenRow(Strict):
    """Another token's row of one model (mergekit's ``{kind: model_token}``)."""

    kind: Literal["model_token"]
    """``model_token``."""
    model: Path
    """The model whose row is taken (one of the merge's inputs)."""
    token: str | None = None
    """The token whose row is taken, looked up in that model's tokenizer (give this or ``token_id``)."""
    token_id: int | None = None
    """The row taken, by index into that model's embedding (give this or ``token``)."""

    @model_validator(mode="after")
    def _one_of(self):
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give token or token_id (exactly one)")
        return self


class TokenRule(Strict):
    """Where one output token's embedding and head rows come from."""

    source: ZeroRow | ModelTokenRow | Path | None = None
    """A model's folder (its row of this token), ``{kind: model_token, model, token | token_id}`` or
    ``{kind: zero}``; null: the default rule (the only model that has the token, else the base's row,
    else the mean of the rows of the models that have it, else zeros). Used for the models that lack the
    token, or for every model with ``force``."""
    force: bool = False
    """Give every model this row before merging, even those that have the token."""


class TokenizerSpec(Strict):
    """The output vocabulary, and how embedding and head rows are aligned to it (mergekit's
    ``tokenizer``: :mod:`mixtune.merge.vocab`)."""

    source: Literal["base", "union"] | Path = "union"
    """``base``: the base's tokenizer (the first model's without a base), less tokens past its
    ``vocab_size``; ``union``: the base's plus every token of the other models (theirs appended in
    config order, each model's by id); or a model's folder: that tokenizer as it is."""
    tokens: dict[str, TokenRule] = {}
    """Rules for single tokens, by token string; a token not in the vocabulary is added to it."""
    pad_to_multiple_of: int | None = Field(None, gt=0)
    """Round the rows up to a multiple of this; the extra rows are each input's mean row."""


class MergeConfig(Strict):
    """A merge recipe (see the module docstring)."""

    method: str
    base_model: Path | None = None
    models: list[ModelEntry] = []
    """The models merged tensor by tensor (give this or ``slices``)."""
    slices: list[SliceEntry] = []
    """Output layers made slice by slice from layer ranges of the inputs, stacked in order (give this
    or ``models``); embeddings come with the first slice's sources, the final norm and head with the last's,
    and the output's layer count is the sum of the slices' (a frankenmerge with ``passthrough``)."""
    parameters: dict[str, Any] = {}
    """The method's parameters, and defaults of its per-model ones (``density``, ``weight``)."""
    dtype: str | None = None
    """float32, bfloat16, float16 or float64. mergekit's methods cast their inputs to it and compute in
    it, as mergekit does (default: the inputs' stored dtype); paper methods compute in float32 and
    only write in it. Unless ``out_dtype`` is set, the merged tensors are written in it (default:
    the compute dtype for mergekit's methods, the base's stored dtype for paper methods)."""
    out_dtype: str | None = None
    """The dtype the merged tensors are written in, when it differs from ``dtype`` (mergekit's
    ``out_dtype``: e.g. compute in float32, write bfloat16)."""
    seed: int = 0
    max_shard_size: str | int = "5GB"
    """Largest output shard: bytes, or e.g. 5GB, 500MB, 2GiB."""
    vocab: Literal["error", "pad", "truncate"] = "error"
    """Without ``tokenizer``, when embedding and head rows differ: stop (default), pad every input with
    zero rows to the largest vocabulary (as fine-tuning transfer does), or cut them to the base's. Both
    go by row, not token: right only where every tokenizer extends the base's."""
    tokenizer: TokenizerSpec | None = None
    """Align embedding and head rows by token string to an output vocabulary and write its tokenizer,
    as mergekit's ``tokenizer`` / ``tokenizer_source`` do (default: none; rows must match, see ``vocab``)."""
    chat_template: str | None = None
    """The output tokenizer's chat template: ``auto`` (the one most of the models have), a name
    (alpaca, chatml, exaone, llama3, mistral) or a Jinja string (default: the tokenizer's own)."""
    files_from: Path | None = None
    """Folder whose config and tokenizer files go beside the merged weights, over the base's
    (default: the base's; for ``transfer``, the fine-tune's)."""

    @model_validator(mode="after")
    def _models_or_slices(self):
        if bool(self.models) == bool(self.slices):
            raise ValueError("give models (merged tensor by tensor) or slices (layer ranges), not "
                             f"{'both' if self.models else 'neither'}")
        return self

    @model_validator(mode="after")
    def _one_vocabulary_rule(self):
        if self.tokenizer is not None and self.vocab != "error":
            raise ValueError(f"give tokenizer (rows aligned by token string) or vocab: {self.vocab} (by row), not both")
        return self


def _dtype(name: Any) -> Any:
    """mergekit's dtype names, which may carry a ``torch.`` prefix."""
    return name.removeprefix("torch.") if isinstance(name, str) else name


def _own(entry: dict, where: str, method: str, takes_weight: bool) -> dict:
    """A model or slice source's fields in mixtune's form: its weight out of its parameters."""
    params = dict(entry.get("parameters") or {})
    out = {"model": entry["model"], "parameters": params}
    if "weight" in params:
        weight = params.pop("weight")
        if not takes_weight:
            raise ConfigError(f"{where}.parameters.weight: {method} takes no weights")
        out["weight"] = weight
    return out


def from_mergekit(doc: dict, where: str = "config") -> dict:
    """mixtune's config fields for a mergekit YAML document (raises ConfigError naming the field)."""
    from mixtune.merge.methods import MERGE_METHODS

    known = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "random_seed",
             "tokenizer_source", "tokenizer", "chat_template"}
    for key in doc:
        if key not in known:
            raise ConfigError(f"{where}: mergekit field {key!r} is not supported by mixtune "
                              f"(supported: {', '.join(sorted(known))})")
    method = doc["merge_method"]
    ours = [n for n in MERGE_METHODS if MERGE_METHODS.get(n).mergekit]
    if method not in ours:
        raise ConfigError(f"{where}: merge_method {method!r} is not supported by mixtune; mergekit methods it runs: "
                          f"{', '.join(ours)}")
    spec = MERGE_METHODS.get(method)
    takes_base = spec.needs_base or spec.optional_base
    takes_weight = spec.weighted
    if doc.get("tokenizer_source") is not None and doc.get("tokenizer") is not None:
        raise ConfigError(f"{where}: give tokenizer_source or tokenizer, not both (mergekit takes one)")
    top = dict(doc.get("parameters") or {})
    if "weight" in top and not takes_weight:
        raise ConfigError(f"{where}: parameters.weight: {method} takes no weights")
    base = doc.get("base_model")
    out: dict = {"method": method, "parameters": top}
    if doc.get("models") and doc.get("slices"):
        raise ConfigError(f"{where}: give models or slices, not both (mergekit takes exactly one)")
    if doc.get("slices"):
        slices = []
        for s, sl in enumerate(doc["slices"]):
            if not isinstance(sl, dict) or not sl.get("sources"):
                raise ConfigError(f"{where}: slices[{s}] needs sources (a list of {{model, layer_range}})")
            extra = set(sl) - {"sources", "base_model", "parameters", "residual_weight"}
            if extra or sl.get("residual_weight") is not None:
                field = sorted(extra)[0] if extra else "residual_weight"
                raise ConfigError(f"{where}: slices[{s}] field {field!r} is not supported")
            sources = []
            for j, src in enumerate(sl["sources"]):
                here = f"slices[{s}].sources[{j}]"
                if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                    raise ConfigError(f"{where}: {here} needs a 'model' and a 'layer_range'")
                extra = set(src) - {"model", "layer_range", "parameters"}
                if extra:
                    raise ConfigError(f"{where}: {here} field {sorted(extra)[0]!r} is not supported")
                sources.append(_own(src, f"{where}: {here}", method, takes_weight) | {"layer_range": src["layer_range"]})
            entry = {"sources": sources, "parameters": dict(sl.get("parameters") or {})}
            if sl.get("base_model") is not None:
                entry["base_model"] = sl["base_model"]
            slice_base = sl.get("base_model") or base
            for j, src in enumerate(sources):
                is_base = takes_base and src["model"] == slice_base
                if takes_weight and not is_base and "weight" not in src and "weight" not in entry["parameters"] \
                        and "weight" not in top:
                    raise ConfigError(f"{where}: slices[{s}].sources[{j}] ({src['model']}) has no weight (mergekit "
                                      "requires one)")
            slices.append(entry)
        out["slices"] = slices
    else:
        models = []
        for i, entry in enumerate(doc.get("models") or []):
            if not isinstance(entry, dict) or "model" not in entry:
                raise ConfigError(f"{where}: models[{i}] needs a 'model' path")
            extra = set(entry) - {"model", "parameters"}
            if extra:
                raise ConfigError(f"{where}: models[{i}] field {sorted(extra)[0]!r} is not supported")
            if takes_base and entry["model"] == base:
                continue  # mergekit takes the base as the base, not as one of the models
            own = _own(entry, f"{where}: models[{i}]", method, takes_weight)
            if takes_weight and "weight" not in own and "weight" not in top:
                raise ConfigError(f"{where}: models[{i}] ({entry['model']}) has no weight (mergekit requires one)")
            models.append(own)
        if not takes_base and base is not None and all(m["model"] != base for m in models):
            # mergekit adds a base the models do not list as one more input (mergekit/plan.py:143-157), which
            # a method without a base merges like the rest (karcher averages it in); for a weighted one
            # (linear) mixtune will not guess the base's weight
            if takes_weight:
                raise ConfigError(f"{where}: base_model: {method} takes no base model; mergekit merges a base the "
                                  "models do not list as one more model, so list it under models with its weight "
                                  "(or remove base_model)")
            models.append({"model": base, "parameters": {}})
        out["models"] = models
    # mergekit aligns vocabularies by token string when given a tokenizer (mergekit/plan.py:64-76,
    # 213-226) and otherwise stops at rows that differ; so does mixtune (vocab stays "error")
    if doc.get("tokenizer_source") is not None:
        out["tokenizer"] = {"source": doc["tokenizer_source"]}
    elif isinstance(doc.get("tokenizer"), dict):  # mergekit writes unset fields as null
        out["tokenizer"] = {k: v for k, v in doc["tokenizer"].items() if v is not None}
    elif doc.get("tokenizer") is not None:
        raise ConfigError(f"{where}: tokenizer: expected a mapping (source, tokens, pad_to_multiple_of)")
    if doc.get("chat_template") is not None:
        out["chat_template"] = doc["chat_template"]
    if base is not None:
        out["base_model"] = base
    for key in ("dtype", "out_dtype"):
        if doc.get(key) is not None:
            out[key] = _dtype(doc[key])
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
        if getattr(e, "context", None) == "expected a single document in the stream":  # pyyaml's words
            raise ConfigError(f"{path}: holds several YAML documents (separated by ---), one merge each: run them with "
                              "`mixtune merge CONFIG --out DIR` or mixtune.merge.multi.load_multi_config") from None
        raise ConfigError(f"{path}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not (isinstance(doc, dict) and "merge_method" in doc):
        return load_config(MergeConfig, path, overrides)
    data = from_mergekit(doc, str(path))
    for key, value in (overrides or {}).items():
        apply_override(data, key, value)
    return validate(MergeConfig, data, where=f"{path} (read as a mergekit config)")
