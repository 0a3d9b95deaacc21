"""Load a local Hugging Face model directory and its tokenizer; safetensors only by default."""

from __future__ import annotations

import os
from pathlib import Path

from mixtune.core import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a local model folder."""
    from transformers import AutoTokenizer

    path = Path(path)
    _check_dir(path)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load a tokenizer from this folder ({e})") from None


def load_model(path: str | os.PathLike, *, allow_pickle: bool = False, dtype: str = "float32"):
    """Load ``(model, tokenizer)`` from a local Hugging Face folder.

    Args:
        path: folder with ``config.json``, safetensors weights (single or sharded) and a tokenizer.
        allow_pickle: also accept ``pytorch_model.bin``-style pickle weights. Unpickling can run
            arbitrary code, so this is off unless you trust where the files came from.
        dtype: torch dtype name to load the weights in.

    Raises:
        CheckpointError: the folder is missing, has no config, holds only pickle weights
            (without ``allow_pickle``), cannot be loaded, or its tokenizer has ids past the
            model's embedding rows.
    """
    import torch
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
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, use_safetensors=bool(safe), dtype=getattr(torch, dtype)
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
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
