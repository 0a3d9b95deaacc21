"""Quantised loading through bitsandbytes: QLoRA's 4-bit NF4 base, or LLM.int8()'s 8-bit one.

bitsandbytes is optional: it is imported only when a recipe asks for quantisation, and its
absence, or a build with no kernels for this device, is a one-line :class:`ConfigError` that
says what to install. Training a quantised base is for adapter methods only (the 4-bit or 8-bit
integers cannot take gradients); :mod:`mixtune.train.methods` enforces it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

from mixtune.core import ConfigError

MIN_VERSION = "0.46.1"
"""The oldest bitsandbytes transformers 5 quantises with (its BITSANDBYTES_MIN_VERSION)."""
INSTALL = f"pip install -U 'bitsandbytes>={MIN_VERSION}'"


def check_bitsandbytes(mode: str, device: str) -> None:
    """bitsandbytes is importable and quantises a small tensor on ``device`` (``cuda`` or ``cpu``).

    Raises:
        ConfigError: it is not installed, older than transformers accepts, fails to import, or has no
            backend for ``device``.
    """
    where = f"load.quantization = {mode!r}"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{where} needs bitsandbytes, which is not installed: {INSTALL}, or remove "
                          "load.quantization")
    import torch
    from packaging.version import Version

    have = importlib.metadata.version("bitsandbytes")
    if Version(have) < Version(MIN_VERSION):
        raise ConfigError(f"{where}: bitsandbytes {have} is older than transformers accepts ({MIN_VERSION}): {INSTALL}")

    try:
        import bitsandbytes.functional as bnbf

        x = torch.ones(64, dtype=torch.float32, device=device)
        if mode == "4bit":
            bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4")
        else:
            bnbf.int8_vectorwise_quant(x.view(1, -1).half())
    except Exception as e:  # an old wheel without CPU kernels, a CUDA build that does not match the driver...
        first = " ".join(str(e).split())[:300]
        raise ConfigError(f"{where}: bitsandbytes has no working {mode} backend on {device} ({type(e).__name__}: "
                          f"{first}); {INSTALL} for this device, or remove load.quantization") from None


def bnb_config(mode: str, compute_dtype):
    """transformers' ``BitsAndBytesConfig``: for 4bit QLoRA's NF4 with double quantisation and
    ``compute_dtype`` for the matmuls (Dettmers et al., 2023, arXiv:2305.14314, Sec. 3); for 8bit
    LLM.int8() (Dettmers et al., 2022, arXiv:2208.07339) with its default outlier threshold."""
    from transformers import BitsAndBytesConfig

    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def quantized_device() -> str:
    """Where a quantised model is loaded: this process's GPU (bitsandbytes quantises as it places
    the weights there, and accelerate trains a quantised model only on the device it was loaded on),
    else the CPU."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def is_quantized(model) -> str | None:
    """How ``model`` (or the base under a peft model) is quantised: ``"4bit"`` / ``"8bit"`` for
    bitsandbytes, the method's name for others (a GPTQ checkpoint loads quantised whatever the
    recipe says), None when it is not."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return None
    if getattr(model, "is_loaded_in_4bit", False):
        return "4bit"
    if getattr(model, "is_loaded_in_8bit", False):
        return "8bit"
    method = getattr(quantizer.quantization_config, "quant_method", "quantised")
    return str(getattr(method, "value", method))
