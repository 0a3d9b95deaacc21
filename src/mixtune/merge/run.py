"""Merge checkpoints tensor by tensor as a :class:`~mixtune.merge.config.MergeConfig` says.

Every tensor is read, merged, cast and written before the next is read: paper methods get it as
stored and compute in float32; mergekit's methods get it cast to the config's ``dtype`` (default:
as stored, promoted) and compute in that, as mergekit does (:mod:`mixtune.merge.compat`). What
each output tensor is made of is planned first (:mod:`mixtune.merge.plan`: the same-named tensors
of every model, or for ``slices`` layer ranges of several), and parameters that vary by tensor
are resolved at each (:mod:`mixtune.merge.settings`). A
method with ``scope: global`` first finds its whole-model statistics in streaming passes over the
inputs (:mod:`mixtune.merge.context`). Inputs are checked first: a missing tensor, a shape mismatch,
a different architecture or a NaN/Inf stops the merge with one line naming the model and the
tensor. Vocabulary sizes may differ only when the config says what to do: ``tokenizer`` aligns
embedding and head rows by token string to an output vocabulary, as mergekit does, and writes its
tokenizer (:mod:`mixtune.merge.vocab`); without it ``vocab: pad`` pads them with zeros to the
largest vocabulary and ``vocab: truncate`` cuts them to the base's, by row. A peft LoRA adapter
folder is accepted wherever a model is, applied to the base.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
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
from mixtune.merge.plan import OutTensor, normpath, own_settings, plan_models, plan_slices
from mixtune.merge.settings import check_model_values, explain, is_scalar, leaves, split, tensor_parameters, validated
from mixtune.merge.chat_templates import chat_template_text
from mixtune.merge.vocab import RowPlan, Vocabulary, build_vocabulary, chosen_template, reserialize, write_tokenizer

_explain = explain  # the name study_merges imports

VOCAB = re.compile(r"embed|lm_head|wte|word_embeddings|(^|\.)output\.weight$")
"""Names of the tensors whose first dimension is the vocabulary."""

VOCAB_HINT = (" (vocabulary sizes differ: align rows by token string with tokenizer: {source: base | union | MODEL} "
              "(mergekit: tokenizer_source), or pad / cut them by row with vocab: pad | truncate)")


def resolve(cfg: MergeConfig, base_dir: Path = Path(".")):
    """The method, its validated parameters, the per-model parameters (of ``models``: entries), and the
    resolved paths of the base and the models (for ``slices``, every source model but the base);
    errors name the field. Parameters that vary by tensor are checked at every value they can take;
    the parameters returned hold their first."""
    method = MERGE_METHODS.get(cfg.method)
    for name in ("dtype", "out_dtype"):
        value = getattr(cfg, name)
        if value is not None and value not in DTYPES:
            raise ConfigError(f"{name} {value!r}: expected one of {', '.join(DTYPES)}")
    groups = [("parameters", cfg.parameters)]
    groups += [(f"slices[{s}].parameters", sl.parameters) for s, sl in enumerate(cfg.slices)]
    entries = [(f"models[{i}] ({m.model})", m) for i, m in enumerate(cfg.models)]
    entries += [(f"slices[{s}].sources[{j}] ({src.model})", src) for s, sl in enumerate(cfg.slices)
                for j, src in enumerate(sl.sources)]
    if not method.mergekit:
        varying = [f"{where}.{k}" for where, g in groups + [(w, own_settings(e)) for w, e in entries]
                   for k, v in g.items() if not is_scalar(v) and v is not None]
        if varying:
            raise ConfigError(f"{varying[0]}: gradients and filters are for mergekit's methods; {cfg.method} takes one "
                              "value (or use a mergekit method)")
    if not method.weighted:
        given = [w for w, e in entries if e.weight is not None] + [w for w, g in groups if "weight" in g]
        if given:
            raise ConfigError(f"{given[0]}: {cfg.method} takes no weights")
    shared_top, model_top = split(method, cfg.parameters)
    if method.mergekit:
        complete: dict = {}  # the first value of every shared parameter, whichever level gives it
        for _, g in groups:
            complete |= leaves(split(method, g)[0], "parameters")[0]
        for where, g in groups:
            shared, per = split(method, g)
            for values in leaves(shared, where):
                validated(method.params, complete | values, f"{where} for {cfg.method}")
            for values in leaves(per, where):
                check_model_values(method, values, f"{where} for {cfg.method}")
        first_slice = split(method, cfg.slices[0].parameters)[0] if cfg.slices else {}
        params = validated(method.params, leaves(shared_top, "parameters")[0] | leaves(first_slice, "slices[0]")[0],
                            f"parameters for {cfg.method}")
    else:
        params = validated(method.params, shared_top, f"parameters for {cfg.method}")
    for where, e in entries:
        own = own_settings(e)
        for values in leaves(own, where) if method.mergekit else [own]:
            check_model_values(method, values, f"{where} parameters for {cfg.method}")
    per_model = []
    for i, m in enumerate(cfg.models):
        where = f"models[{i}] ({m.model})"
        first = leaves(model_top, "parameters")[0] | leaves(own_settings(m), where)[0]
        first.pop("weight", None)
        per_model.append(validated(method.model_params, first, f"{where} parameters for {cfg.method}"))
    low, high = method.n_models
    if cfg.models and (len(cfg.models) < low or (high is not None and len(cfg.models) > high)):
        want = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
        raise ConfigError(f"{cfg.method} merges {want} model(s) besides the base; the config gives {len(cfg.models)}")
    if method.needs_base and cfg.base_model is None and not (cfg.slices and all(sl.base_model for sl in cfg.slices)):
        raise ConfigError(f"method {cfg.method} needs base_model (the model the task vectors are taken from)")
    parse_size(cfg.max_shard_size)
    if cfg.chat_template is not None:
        chat_template_text(cfg.chat_template)
    base = here(cfg.base_model, base_dir) if cfg.base_model is not None else None
    if cfg.models:
        return method, params, per_model, base, [here(m.model, base_dir) for m in cfg.models]
    sources = []
    for sl in cfg.slices:
        for src in sl.sources:
            p = normpath(here(src.model, base_dir))
            if p not in sources and p != (normpath(base) if base else None):
                sources.append(p)
    return method, params, per_model, base, sources


def here(p: Path, base_dir: Path) -> Path:
    """A config path, taken from the config's folder unless absolute."""
    return p if p.is_absolute() else base_dir / p


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

    Returns the output shape of every tensor: the reference's, except that with ``vocab`` pad,
    truncate or align the vocabulary rows of embeddings and heads may differ (pad: the largest;
    truncate: the reference's; align, for ``tokenizer``: the reference's, to be replaced by the
    output vocabulary's).
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
            hint = VOCAB_HINT if rows_only else ""
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


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
"""config.json keys holding the number of blocks, set for slices (mergekit's ``num_layers_config_key``)."""


def _copy_files(reference: Path, files_from: Path | None, folder: Path, shapes: dict,
                layers: int | None = None, dtype: str | None = None) -> None:
    """Config and tokenizer files: the reference's, overlaid by ``files_from``'s; ``vocab_size`` set
    to the output's embedding rows when padding, truncation or a tokenizer changed them, the layer count to
    ``layers`` when slices set it, and the dtype to ``dtype`` when the config names one (as mergekit
    sets it, mergekit/merge.py:297-300)."""
    copy_side_files(reference, folder)
    if files_from is not None and Path(files_from) != Path(reference):
        copy_side_files(Path(files_from), folder)
    config = folder / "config.json"
    if not config.exists():
        return
    c = json.loads(config.read_text())
    changed = False
    rows = [shape[0] for k, shape in shapes.items() if VOCAB.search(k) and len(shape) == 2]
    if rows and c.get("vocab_size") not in (None, rows[0]):
        c["vocab_size"] = rows[0]
        changed = True
    if dtype is not None:
        key = "torch_dtype" if "torch_dtype" in c and "dtype" not in c else "dtype"
        if c.get(key) != dtype:
            c[key] = dtype
            changed = True
    if layers is not None:
        for key in LAYER_COUNT_KEYS:
            if key in c and c[key] != layers:
                c[key] = layers
                changed = True
                break
    if changed:
        atomic_write_text(config, json.dumps(c, indent=2))


def merge_tensors(method, params, per_model: list, weights: list[float], keys: list[str],
                  load: Callable[[str], list[torch.Tensor]], *, sizes: dict[str, int], has_base: bool, seed: int = 0,
                  progress: Callable[[str], None] | None = None, on_pass: Callable[[str], None] | None = None,
                  dtypes: dict[str, torch.dtype] | None = None,
                  parameters: Callable[[str], tuple] | None = None):
    """Yields ``(key, merged tensor)`` for each of ``keys``, in order: in ``dtypes[key]`` or float32
    (paper methods), in the inputs' dtype (mergekit's methods: the caller casts them).

    ``load(key)`` gives the inputs' tensors of one parameter (base first when ``has_base``, None
    for a tensor without one); ``sizes`` gives each key's entry count (per model). ``parameters(key)``,
    when given, gives the key's ``(params, per_model, weights)`` in place of the fixed ones. With
    ``scope: global`` the whole-model statistics are found first, in streaming passes over ``keys``.
    ``progress`` is called with each key as it is merged, in every pass; ``on_pass`` as each pass begins.
    """
    layers = {k: layer_index(k) for k in keys}
    num_layers = 1 + max((i for i in layers.values() if i is not None), default=-1)
    fixed = (params, per_model, weights)
    of = parameters or (lambda key: fixed)

    def context(key: str) -> Context:
        return Context(key=key, rng=torch.Generator().manual_seed(tensor_seed(seed, key)), per_model=of(key)[1],
                       layer=layers[key], num_layers=num_layers, dtype=(dtypes or {}).get(key, torch.float32))

    def combine(key: str, ctx: Context, tensors: list) -> torch.Tensor:
        base, models = (tensors[0], tensors[1:]) if has_base else (None, tensors)
        p, _, w = of(key)
        out = method.fn(base, models, w, p, ctx)
        if progress is not None:
            progress(key)
        return out

    def run(key: str, ctx: Context) -> torch.Tensor:
        return combine(key, ctx, load(key))

    known = {}
    if getattr(params, "scope", None) == "global":
        known = resolve_globals(keys, run, context, sizes, on_pass=on_pass)
    if on_pass is not None:
        on_pass("merging")
    # the next tensor's inputs are read (and cast, and checked) on a thread while this one merges:
    # reading and merging overlap, for one tensor's inputs more in memory
    with ThreadPoolExecutor(1) as reader:
        ahead = reader.submit(load, keys[0]) if keys else None
        for i, key in enumerate(keys):
            tensors = ahead.result()
            ahead = reader.submit(load, keys[i + 1]) if i + 1 < len(keys) else None
            ctx = context(key)
            ctx.known = known
            yield key, combine(key, ctx, tensors)
            del tensors


def _plan_shapes(plan: list[OutTensor], readers: list, vocab: str) -> dict[str, tuple[int, ...]]:
    """Each output tensor's shape: its inputs' (the first input's, the base when there is one),
    vocabulary rows aside as ``vocab`` says; raises CheckpointError naming what differs."""
    shapes = {}
    for tp in plan:
        first = tp.inputs[0]
        want = readers[first.reader].shape(first.key)
        for inp in tp.inputs[1:]:
            got = readers[inp.reader].shape(inp.key)
            if got == want:
                continue
            rows_only = len(got) == len(want) >= 1 and got[1:] == want[1:] and VOCAB.search(tp.key)
            if rows_only and vocab != "error":
                if vocab == "pad":
                    want = (max(want[0], got[0]), *want[1:])
                continue
            hint = VOCAB_HINT if rows_only else ""
            raise CheckpointError(f"{readers[inp.reader].label}: tensor {inp.key} has shape {list(got)}, "
                                  f"{readers[first.reader].label}'s {first.key} has {list(want)}{hint}")
        shapes[tp.key] = tuple(want)
    return shapes


def _align(cfg: MergeConfig, plan: list[OutTensor], readers: list, shapes: dict, folders: list[Path],
           base_dir: Path) -> tuple[Vocabulary, dict[str, RowPlan]]:
    """For ``tokenizer``: the output vocabulary (``folders``: the models, the tokenizer base first) and
    the realignment of every embedding and head tensor of the plan, whose output rows are set in
    ``shapes``; every rule is checked here, before anything is read."""
    folders = list(dict.fromkeys(normpath(f) for f in folders))
    vocabulary = build_vocabulary(cfg.tokenizer, folders, lambda p: normpath(here(p, base_dir)))
    plans = {}
    for tp in plan:
        if not VOCAB.search(tp.key) or len(shapes[tp.key]) < 1:
            continue
        base = cfg.slices[tp.slice].base_model if tp.slice is not None else None
        base = base or cfg.base_model
        plans[tp.key] = vocabulary.plan([normpath(readers[i.reader].folder) for i in tp.inputs],
                                        normpath(here(base, base_dir)) if base is not None else None, tp.key)
        shapes[tp.key] = (vocabulary.size, *shapes[tp.key][1:])
    return vocabulary, plans


def vocab_rule(cfg: MergeConfig) -> str:
    """How rows of embeddings and heads may differ: ``align`` (by token string) with a ``tokenizer``, else
    ``cfg.vocab``."""
    return "align" if cfg.tokenizer is not None else cfg.vocab


def _open_plan(cfg: MergeConfig, method, base_path: Path | None, model_paths: list[Path], base_dir: Path):
    """The opened readers, the reference (config, tokenizer and integer buffers come from it), the
    plan, the output shapes, for slices the output's number of layers (else None), and for
    ``tokenizer`` the output vocabulary and each embedding and head tensor's realignment (else None, {})."""
    takes_base = method.needs_base or method.optional_base
    vocab = vocab_rule(cfg)
    folders = ([base_path] if base_path else []) + model_paths
    if cfg.models:
        inputs = open_inputs(base_path, model_paths)
        try:
            shapes = check_inputs(inputs[0], inputs[1:], vocab)
            readers = inputs if takes_base or base_path is None else inputs[1:]
            plan = plan_models(cfg, inputs[0].keys(), takes_base and base_path is not None)
            aligned = _align(cfg, plan, readers, shapes, folders, base_dir) if cfg.tokenizer else (None, {})
            return inputs, readers, inputs[0], plan, shapes, None, *aligned
        except Exception:
            for r in inputs:
                r.close()
            raise
    inputs = open_inputs(base_path, model_paths)
    try:
        paths = ([normpath(base_path)] if base_path else []) + model_paths
        index_of = {p: i for i, p in enumerate(paths)}
        arch = [(_architecture(r.folder), r) for r in inputs]
        for a, r in arch[1:]:
            if arch[0][0] and a and a != arch[0][0]:
                raise CheckpointError(f"{r.label}: architecture {a} differs from {arch[0][1].label}'s {arch[0][0]}")
        plan, layers = plan_slices(cfg, method, inputs, index_of, lambda p: here(p, base_dir))
        lead = index_of[normpath(here(cfg.slices[0].sources[0].model, base_dir))]
        reference = inputs[0] if base_path else inputs[lead]
        shapes = _plan_shapes(plan, inputs, vocab)
        aligned = (None, {})
        if cfg.tokenizer:
            aligned = _align(cfg, plan, inputs, shapes, [reference.folder, *paths], base_dir)
        return inputs, inputs, reference, plan, shapes, layers, *aligned
    except Exception:
        for r in inputs:
            r.close()
        raise


def check_merge(cfg: MergeConfig, base_dir: Path = Path(".")) -> int:
    """Everything :func:`merge` checks before it writes (the config, every input's headers, the plan
    of every output tensor, their shapes), merging nothing; returns the number of output tensors.
    Unlike :func:`check_inputs` across all inputs, it knows slices: their models may differ in depth."""
    method, _params, _per_model, base_path, model_paths = resolve(cfg, base_dir)
    inputs, *_rest, plan, _shapes, _layers, _vocabulary, _aligned = _open_plan(cfg, method, base_path, model_paths,
                                                                                base_dir)
    for r in inputs:
        r.close()
    return len(plan)


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
    inputs, readers, reference, plan, shapes, layers, vocabulary, aligned = _open_plan(
        cfg, method, base_path, model_paths, base_dir)
    try:
        by_key = {tp.key: tp for tp in plan}
        stored = {tp.key: [TORCH_DTYPES[readers[i.reader].dtype(i.key)] for i in tp.inputs] for tp in plan}
        floating = [tp.key for tp in plan if stored[tp.key][0].is_floating_point]
        # mergekit's methods compute in the config's dtype, else in the inputs' (promoted); paper
        # methods in float32. Written: out_dtype, else dtype, else the compute dtype (mergekit's
        # methods) or the reference's stored dtype (paper methods); integer buffers keep theirs.
        compute = {}
        if method.mergekit:
            for k in floating:
                d = stored[k][0]
                for other in stored[k][1:]:
                    d = torch.promote_types(d, other)
                compute[k] = DTYPES[cfg.dtype] if cfg.dtype else d
        written = cfg.out_dtype or cfg.dtype
        dtype_of = {tp.key: stored[tp.key][0] for tp in plan}
        for k in floating:
            dtype_of[k] = DTYPES[written] if written else compute.get(k, stored[k][0])
        checked: set[str] = set()
        has_base = method.needs_base or method.optional_base

        def load(key: str) -> list[torch.Tensor | None]:
            tp = by_key[key]
            if key in aligned:  # realigned below, after the cast, as mergekit realigns what it loaded
                tensors = [readers[i.reader].get(i.key) for i in tp.inputs]
            else:
                tensors = [_fit(readers[i.reader].get(i.key), shapes[key]) for i in tp.inputs]
            if key not in checked:
                for i, t in zip(tp.inputs, tensors):
                    # a sum is NaN/Inf when an entry is (one fast pass); isfinite confirms, since a sum can overflow
                    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
                        raise CheckpointError(f"{readers[i.reader].label}: tensor {i.key} holds NaN or Inf")
                checked.add(key)
            if key in compute:  # mergekit casts each input to the compute dtype as it loads it
                tensors = [t.to(compute[key]) for t in tensors]
            if key in aligned:
                tensors = aligned[key].apply(tensors, [readers[i.reader].label for i in tp.inputs], key)
            if has_base and not tp.has_base:
                tensors = [None, *tensors]
            return tensors

        at = tensor_parameters(method, cfg, params)
        merged = merge_tensors(method, params, per_model, [], floating, load,
                               sizes={k: math.prod(shapes[k]) for k in floating}, has_base=has_base,
                               seed=cfg.seed, progress=progress, on_pass=on_pass, dtypes=dtype_of,
                               parameters=lambda key: at(by_key[key]))
        write_plan = [(tp.key, shapes[tp.key], dtype_of[tp.key]) for tp in plan]
        reap_stale_partials(out, notice)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            claim(tmp, Path(out))  # so that a later merge can tell this partial from a killed one's
            writer = StreamingWriter(tmp, write_plan, parse_size(cfg.max_shard_size))
            merging = set(floating)
            # each merged tensor is cast and written on a thread while the next one merges
            with ThreadPoolExecutor(1) as output:
                written_ahead = None
                for tp in plan:
                    if tp.key in merging:
                        got, tensor = next(merged)
                        assert got == tp.key
                        if written_ahead is not None:
                            written_ahead.result()
                        written_ahead = output.submit(lambda k, t: writer.add(k, t.to(dtype_of[k])), tp.key, tensor)
                        del tensor
                    else:  # integer buffers are copied from the first input
                        if written_ahead is not None:
                            written_ahead.result()
                            written_ahead = None
                        first = tp.inputs[0]
                        writer.add(tp.key, readers[first.reader].get(first.key))
                        if progress is not None:
                            progress(tp.key)
                if written_ahead is not None:
                    written_ahead.result()
            writer.finish()
            files_from = cfg.files_from and here(cfg.files_from, base_dir)
            if files_from is None and method.files_from:
                files_from = model_paths[method.files_from - 1]
            _copy_files(reference.folder, files_from, tmp, shapes, layers, written)
            models = list(dict.fromkeys(normpath(f) for f in ([base_path] if base_path else []) + model_paths))
            if vocabulary is not None:  # mergekit/merge.py:116-119
                write_tokenizer(vocabulary.tokenizer, tmp, chosen_template(cfg.chat_template, models))
            elif cfg.chat_template is not None:  # mergekit/merge.py:276-284
                reserialize(files_from or reference.folder, tmp, cfg.chat_template, models)
            atomic_write_text(tmp / "merge.yaml", dump_config(cfg))
            release(tmp)
    finally:
        for r in inputs:
            r.close()
    return Path(out)
