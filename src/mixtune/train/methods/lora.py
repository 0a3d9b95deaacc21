"""``lora`` and ``peft``: adapters through ``peft``, saved as ordinary peft adapters.

``lora`` takes LoRA's common fields plus ``options``, any other field of peft's ``LoraConfig``
(``use_dora``, ``use_rslora``, ``init_lora_weights: pissa | olora``, ``rank_pattern`` ...).
``peft`` takes any peft tuner by its type name and passes ``config`` to that tuner's config
class. Both check every field name against peft's own config class first, so a typo is an error
that lists the valid names, never a silently ignored option.

On a quantised base (``load.quantization``, QLoRA) the base is readied with peft's
``prepare_model_for_kbit_training`` first. Adapters are saved in the dtype peft trains them in
(fp32: peft upcasts bf16/fp16 adapters, as transformers' Trainer runs them); ``merge`` writes the
merged model in the base's dtype, and for a quantised base merges into the original base weights
(see :func:`merged_model`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from mixtune.core import CheckpointError, ConfigError, Strict
from mixtune.train.methods.base import check_share, register

CONVERTED_INITS = ("pissa", "olora")
"""Initialisations that change the base weights: their adapters are converted on export so they
apply to the original base (peft's path_initial_model_for_weight_conversion)."""


class LoraParams(Strict):
    name: Literal["lora"] = "lora"
    r: int = Field(default=8, ge=1)
    """Adapter rank."""
    alpha: float = Field(default=16, gt=0)
    """Scale numerator: the update is (alpha / r) B A x."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]), or every linear layer but the output head."""
    options: dict = {}
    """Other peft LoraConfig fields: use_dora (DoRA), use_rslora (rsLoRA), init_lora_weights (pissa, olora,
    gaussian), rank_pattern, alpha_pattern, ..."""
    merge: bool = False
    """Also write the base with the adapter merged in, as a full model in ``merged/`` (off: the adapter alone)."""

    @model_validator(mode="after")
    def _peft_accepts(self) -> LoraParams:  # checked when the recipe is read, not when training starts
        if self.options:
            _check(lambda: lora_config(self))
        return self


def _check(build) -> None:
    try:
        build()
    except ConfigError as e:
        raise ValueError(str(e)) from None


class PeftParams(Strict):
    name: Literal["peft"] = "peft"
    type: str
    """peft's tuner type: LORA, IA3, LOHA, LOKR, OFT, BOFT, VERA, ADALORA, ... (``peft.PeftType``)."""
    config: dict = {}
    """Fields of that tuner's peft config class, e.g. {target_modules: [q_proj, v_proj], r: 8}."""
    merge: bool = False
    """Also write the base with the adapter merged in, as a full model in ``merged/`` (tuners that merge)."""

    @model_validator(mode="after")
    def _peft_accepts(self) -> PeftParams:
        _check(lambda: peft_config(self.type, self.config, "train.method.config"))
        return self


def peft_config(kind: str, fields: dict, where: str):
    """peft's config object of tuner ``kind`` from ``fields``, every name checked against its class."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    types = {str(getattr(t, "value", t)): cls for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    cls = types.get(kind.upper())
    if cls is None:
        close = difflib.get_close_matches(kind.upper(), types, n=3)
        raise ConfigError(f"{where}.type = {kind!r}: not a peft tuner"
                          f"{f' (did you mean {close[0]}?)' if close else ''}; known: {', '.join(sorted(types))}")
    valid = {f.name for f in dataclasses.fields(cls) if f.init} - {"peft_type", "task_type"}
    for key in fields:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            raise ConfigError(f"{where}: {key!r} is not a field of peft's {cls.__name__}"
                              f"{f' (did you mean {close[0]!r}?)' if close else ''}; fields: {', '.join(sorted(valid))}")
    if str(fields.get("init_lora_weights", "")).startswith("corda"):
        raise ConfigError(f"{where}: init_lora_weights corda needs a calibration pass over data, which mixtune's "
                          "tuning methods do not run; use pissa or olora, or build the CorDA adapter with peft")
    try:
        config = cls(task_type="CAUSAL_LM", **fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: peft's {cls.__name__} refused the config: {e}") from None
    if getattr(config, "is_prompt_learning", False):
        raise ConfigError(f"{where}.type = {kind}: prompt-learning tuners add virtual tokens, which mixtune's "
                          "packed training rows (with position ids) do not support")
    return config


def _attach(model, config, where: str):
    from peft import get_peft_model

    from mixtune.models.quantize import is_quantized

    quantized = is_quantized(model)
    if quantized is not None and hasattr(model, "peft_config"):  # load_for_eval leaves it unmerged
        raise ConfigError(f"{where}: the starting model is an adapter left unmerged on a {quantized} quantised base; a "
                          "new adapter cannot go on top (merging the first into the quantised weights would round it "
                          "away); train the stages in one run, which goes on training one adapter, or load the base "
                          "unquantised")
    if quantized is not None:
        # QLoRA (Dettmers et al., 2023, arXiv:2305.14314): freeze the base, keep its norms and embeddings in
        # fp32 for stable training; the loop enables gradient checkpointing itself (train.gradient_checkpointing)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, TypeError) as e:  # peft refuses a layer type with TypeError (LoHa on GPT-2's Conv1D)
        kind = str(getattr(config.peft_type, "value", config.peft_type))
        raise ConfigError(f"{where}: peft's {kind} cannot adapt {type(model).__name__}: {e}") from None
    init = str(getattr(config, "init_lora_weights", ""))
    if init.startswith(CONVERTED_INITS):  # keep the initial adapter, to convert the trained one on export
        initial = Path(tempfile.mkdtemp(prefix="mixtune-initial-adapter-"))
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(str(initial))
        peft_model.peft_config["default"].init_lora_weights = config.init_lora_weights
        peft_model.mixtune_initial_adapter = initial
        # every export needs it while the model lives; removed with the model, or at exit at the latest
        weakref.finalize(peft_model, shutil.rmtree, initial, True)
    _check_adapters(peft_model, config)
    return peft_model


def _check_adapters(peft_model, config) -> None:
    """Only the adapter trains (its parameters carry the adapter's name, ``...lora_A.default.weight``),
    all of it for LoRA; logged as a share of the adapter and of the model."""
    adapter = peft_model.active_adapter
    ours = {n: q for n, q in peft_model.named_parameters() if adapter in n.split(".")}
    base = [n for n, q in peft_model.named_parameters() if q.requires_grad and n not in ours]
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if base:
        raise ConfigError(f"train.method ({kind}): base parameters train besides the adapter "
                          f"({', '.join(base[:3])})")
    lora = kind == "LORA"  # other tuners may keep parts of their adapter fixed
    check_share(kind.lower(), peft_model, trained=sum(q.numel() for q in ours.values() if q.requires_grad),
                intended=sum(q.numel() for q in ours.values()), of=f"adapter {adapter!r} parameters",
                low=1.0 if lora else 0.0, why="the adapter is what trains")


def lora_config(p: LoraParams):
    """peft's LoraConfig for ``p`` (its own fields, then ``options``)."""
    fields = {"r": p.r, "lora_alpha": p.alpha, "lora_dropout": p.dropout, "target_modules": p.target_modules}
    overlap = set(fields) & set(p.options)
    if overlap:
        raise ConfigError(f"train.method.options sets {sorted(overlap)}, which lora's own fields set (r, alpha, "
                          "dropout, target_modules)")
    return peft_config("LORA", fields | p.options, "train.method.options")


def prepare(model, p: LoraParams, seed: int):
    """LoRA (Hu et al., 2021, arXiv:2106.09685), Eq. 3: h = W0 x + (alpha / r) B A x, with W0 frozen,
    A ~ Kaiming-uniform and B = 0 at start (peft's defaults); ``options`` reach peft's variants
    (DoRA, rsLoRA, PiSSA and OLoRA initialisation)."""
    return _attach(model, lora_config(p), "train.method")


def prepare_peft(model, p: PeftParams, seed: int):
    """Any peft tuner by name (Mangrulkar et al., 2022, peft: https://github.com/huggingface/peft),
    configured by its own config class; see each tuner's paper in peft's documentation."""
    return _attach(model, peft_config(p.type, p.config, "train.method.config"), "train.method")


def export(model, p, out_dir: Path, state_dict: dict | None) -> None:
    """The adapter alone (peft's save_pretrained, in its training dtype); with ``merge`` also the
    merged full model in ``merged/``, merged on a copy so that training goes on unchanged."""
    initial = getattr(model, "mixtune_initial_adapter", None)
    if initial is not None:  # PiSSA/OLoRA moved the base: save an adapter that applies to the original base
        model.save_pretrained(str(out_dir), path_initial_model_for_weight_conversion=str(initial))
    else:
        model.save_pretrained(out_dir, state_dict=state_dict)
    if p.merge:
        merged_model(model, out_dir).save_pretrained(out_dir / "merged")


def merged_model(model, adapter_dir: Path):
    """The base with the adapter merged in (peft's merge_and_unload), in the base's dtype, on a copy so
    that training goes on unchanged.

    A quantised base (QLoRA) is not merged into: its 4-bit or 8-bit weights would round the update
    back onto their grid. The original base is read again from its folder (the adapter's
    ``base_model_name_or_path``), unquantised, in the compute dtype, on the CPU, and the adapter saved in
    ``adapter_dir`` is merged into it: the same model :func:`mixtune.eval.load_for_eval` builds
    from the adapter. It needs the memory of the unquantised base.
    """
    from mixtune.models.quantize import is_quantized

    if is_quantized(model) is None:
        return copy.deepcopy(model).merge_and_unload()
    from peft import PeftModel

    from mixtune.models import LoadConfig, load_model
    from mixtune.models.load import dtype_name

    base_dir = model.peft_config[model.active_adapter].base_model_name_or_path
    attn = getattr(model.config, "_attn_implementation", None)
    base, _ = load_model(base_dir, load=LoadConfig(dtype=dtype_name(model.config.dtype), attn_implementation=attn))
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def load_export(model, p, folder: Path) -> None:
    """Put an exported adapter back into the peft model ``prepare`` made. A PiSSA/OLoRA export was
    converted to [A | A0], [B | -B0] (peft's subtract_mutated_init) and the model's base is still
    the residual one, so its trained A and B are the leading rows / columns."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(Path(folder) / "adapter_model.safetensors"))
    own = get_peft_model_state_dict(model)
    if getattr(model, "mixtune_initial_adapter", None) is not None:
        saved = {k: v[tuple(slice(0, n) for n in own[k].shape)] if k in own else v for k, v in saved.items()}
    lacking = sorted(set(own) - set(saved))
    unexpected = set_peft_model_state_dict(model, saved).unexpected_keys
    if lacking or unexpected:
        raise CheckpointError(f"{folder}: the adapter does not fit this method (missing {lacking[:3]}, unexpected "
                              f"{list(unexpected)[:3]}); it was written by another recipe. Pass --fresh to retrain")


register("lora", LoraParams, prepare=prepare, export=export, load_export=load_export, quantized_base=True)
register("peft", PeftParams, prepare=prepare_peft, export=export, load_export=load_export, quantized_base=True)
