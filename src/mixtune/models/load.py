"""Load a local Hugging Face model directory and its tokenizer; safetensors only by default.

:class:`LoadConfig` (a recipe's ``load`` section) says how: the weights' dtype (by default the one
the checkpoint's ``config.json`` names, so a bf16 model trains and is saved in bf16), the
attention kernel, and quantisation through bitsandbytes for QLoRA (:mod:`mixtune.models.quantize`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal

from mixtune.core import CheckpointError, ConfigError, Strict

log = logging.getLogger("mixtune.models")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""``load.dtype`` names -> torch dtype names."""


class LoadConfig(Strict):
    """How a model is loaded: the weights' dtype, the attention kernel, quantisation."""

    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Dtype of the weights. ``auto``: the one the checkpoint's config.json names (``dtype`` or
    ``torch_dtype``), fp32 when it names none. The model trains in it and every export is saved in
    it (bf16 in, bf16 out); ``train.precision`` adds autocast on top and changes no stored weight."""
    attn_implementation: str | None = None
    """Attention kernel, passed to transformers: ``sdpa``, ``eager``, ``flash_attention_2``,
    ``flex_attention``, ... None: ``flash_attention_2`` where it can run (a CUDA GPU and the
    ``flash_attn`` package installed, an architecture that takes it), whose varlen kernel attends
    within each packed example from the restarting ``position_ids``; otherwise transformers' default
    for the architecture (``sdpa`` for most), which builds the same block-diagonal mask."""
    quantization: Literal["4bit", "8bit"] | None = None
    """Load the weights quantised through bitsandbytes (installed separately): ``4bit`` is QLoRA's
    NF4 with double quantisation, computing in ``dtype``; ``8bit`` is LLM.int8(). Adapter methods
    only (``lora``, ``peft``): the base stays frozen. None: not quantised."""


def default_attention() -> str | None:
    """The attention kernel a load without ``attn_implementation`` asks for: ``flash_attention_2``
    when a CUDA GPU is present and the ``flash_attn`` package is installed, else None
    (transformers' default)."""
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def _about_attention(e: Exception) -> bool:
    """Whether transformers' error is about the attention kernel (a name it does not know, or a kernel
    that is not installed) rather than the checkpoint."""
    text = str(e)
    return isinstance(e, ImportError) or "attn" in text or "attention" in text.lower()


def load_dtype(path: Path, dtype: str):
    """The torch dtype to load ``path`` in: ``dtype`` (``bf16`` / ``fp16`` / ``fp32``), or for ``auto``
    the one its ``config.json`` names (fp32 when it names none).

    Raises:
        CheckpointError: ``config.json`` is not JSON, or names a dtype that is not a float type.
    """
    import torch

    if dtype != "auto":
        return getattr(torch, DTYPES[dtype])
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    name = raw.get("dtype") or raw.get("torch_dtype")  # transformers 5 writes dtype, 4.x torch_dtype
    if name is None:
        return torch.float32
    found = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise CheckpointError(f"{path / 'config.json'}: dtype = {name!r} is not a float dtype; set load.dtype to "
                              "bf16, fp16 or fp32")
    return found


def dtype_name(dtype) -> str:
    """``load.dtype``'s name for a torch float dtype (``torch.bfloat16`` -> ``bf16``)."""
    return next(k for k, v in DTYPES.items() if v == str(dtype).removeprefix("torch."))


def weight_files(path: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """The ``(safetensors, pickle)`` weight files directly inside a model folder."""
    path = Path(path)
    safe = sorted(path.glob("*.safetensors"))
    pickled = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    return safe, pickled


def _check_dir(path: Path) -> None:
    if not path.exists():
        import difflib

        parent = next((p for p in path.parents if p.is_dir()), Path("."))
        near = difflib.get_close_matches(str(path), [str(p) for p in parent.iterdir() if p.is_dir()], n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(near)}?" if near else ""
        raise CheckpointError(
            f"{path}: no such folder{hint} (mixtune loads local Hugging Face folders, config.json + "
            f"*.safetensors, and never downloads)"
        )
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a model folder (config.json + *.safetensors), found a file")


def pad_id_of(tokenizer) -> int | None:
    """The id rows are padded with: the tokenizer's pad token, else its EOS (None when it has neither)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a local model folder."""
    from transformers import AutoTokenizer

    path = Path(path)
    _check_dir(path)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load a tokenizer from this folder ({e})") from None


def load_model(path: str | os.PathLike, *, load: LoadConfig | None = None, allow_pickle: bool = False):
    """Load ``(model, tokenizer)`` from a local Hugging Face folder.

    Args:
        path: folder with ``config.json``, safetensors weights (single or sharded) and a tokenizer.
        load: dtype, attention kernel and quantisation (default :class:`LoadConfig`: the dtype the
            checkpoint's config names, transformers' attention, not quantised).
        allow_pickle: also accept ``pytorch_model.bin``-style pickle weights. Unpickling can run
            arbitrary code, so this is off unless you trust where the files came from.

    Raises:
        CheckpointError: the folder is missing, has no config, holds only pickle weights
            (without ``allow_pickle``), cannot be loaded, or its tokenizer has ids past the
            model's embedding rows.
        ConfigError: transformers refuses ``load.attn_implementation``, or ``load.quantization``
            is set and bitsandbytes is missing or has no backend for this device.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = Path(path)
    _check_dir(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; expected a Hugging Face model folder")
    safe, pickled = weight_files(path)
    if not safe and not pickled:
        raise CheckpointError(f"{path}: no weight files (*.safetensors) in this folder")
    if not safe and not allow_pickle:
        names = ", ".join(p.name for p in pickled)
        raise CheckpointError(
            f"{path}: has only pickle weights ({names}). Loading pickle can run arbitrary code, so "
            f"mixtune loads safetensors only. Convert the checkpoint to safetensors, or, if you trust "
            f"its source, pass --allow-pickle (allow_pickle=True)."
        )
    load = load or LoadConfig()
    dtype = load_dtype(path, load.dtype)
    kwargs: dict = {"local_files_only": True, "use_safetensors": bool(safe), "dtype": dtype}
    chosen = load.attn_implementation or default_attention()
    if chosen is not None:
        kwargs["attn_implementation"] = chosen
    if load.quantization is not None:
        from mixtune.models.quantize import bnb_config, check_bitsandbytes, quantized_device

        device = quantized_device()
        check_bitsandbytes(load.quantization, device)
        kwargs["quantization_config"] = bnb_config(load.quantization, dtype)
        if device != "cpu":
            kwargs["device_map"] = {"": device}
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except (ValueError, ImportError) as e:
            if load.attn_implementation is not None or chosen is None or not _about_attention(e):
                raise
            kwargs.pop("attn_implementation")  # chosen here, and the architecture refuses it: its default
            log.info("%s: flash_attention_2 refused; using the architecture's default attention", path)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError, ImportError, SafetensorError) as e:
        text = " ".join(str(e).split())
        if load.attn_implementation is not None and _about_attention(e):  # an unknown name, or a kernel not installed
            raise ConfigError(f"load.attn_implementation = {load.attn_implementation!r}: transformers cannot use it "
                              f"for {path} ({text})") from None
        if isinstance(e, ImportError):
            raise
        raise CheckpointError(f"{path}: cannot load the model ({e})") from None
    if (path / "moe_lora.json").exists():  # a mixture of LoRA experts saved beside its base
        from mixtune.models.moe_lora import load_into

        model = load_into(model, path)
    tokenizer = load_tokenizer(path)
    check_vocabulary(model, tokenizer, str(path))
    return model, tokenizer


def check_vocabulary(model, tokenizer, where: str) -> None:
    """Every id the tokenizer can produce (``len(tokenizer)`` and the largest special-token id) must
    have a row in the model's input embedding; otherwise ``torch.embedding`` fails mid-run with an
    ``IndexError``. ``where`` names the model (and tokenizer) in the error.

    Raises:
        CheckpointError: the tokenizer has more ids than the model has embedding rows.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    special = max(tokenizer.all_special_ids, default=-1)
    n = max(len(tokenizer), special + 1)
    if n > rows:
        raise CheckpointError(
            f"{where}: the tokenizer has {n:,} token ids (len(tokenizer) = {len(tokenizer):,}, largest special-token "
            f"id {special:,}) but the model's input embedding has {rows:,} rows, so ids {rows:,}-{n - 1:,} cannot be "
            f"embedded; use the tokenizer saved with this model, or call model.resize_token_embeddings({n}) and "
            f"save the model with the tokenizer"
        )
