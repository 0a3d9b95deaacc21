"""What a tuning method is: typed params, a ``prepare`` that readies the model, an ``export`` and
its inverse ``load_export``, and optional hooks for methods that re-select what trains, bring
their own optimizer or add a loss."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtune.core import CheckpointError, ConfigError, Registry, Strict

log = logging.getLogger("mixtune.train")


@dataclass(frozen=True)
class Tuner:
    """A registered tuning method.

    ``prepare(model, params, seed) -> model`` marks what trains (or injects adapters) before
    training; ``export(model, params, out_dir, state_dict)`` writes the trained model in the
    form the ecosystem loads (a Hugging Face folder, or the adapter alone for adapter methods);
    ``load_export(model, params, folder)`` puts an export's trained weights back into a model
    ``prepare`` made (a run resuming at a stage boundary; default :func:`load_full`). Optional hooks:

    - ``start_stage(model, params, seed, stage)``: before each stage's optimizer is built (HFT
      draws its half here);
    - ``optimizer(model, params, lr, weight_decay) -> torch.optim.Optimizer``: instead of AdamW
      over the parameters that require gradients (LIFT's sparse AdamW); the optimizer may expose
      ``state_bytes()``, the memory its state takes;
    - ``before_forward(model, micro_batch)``: sees each micro-batch before its forward pass;
    - ``aux_loss(model) -> Tensor | None``: added to each micro-batch's loss after its forward
      pass (a router's load-balancing loss);
    - ``batch_stats(model, source_ids, n_sources) -> dict[str, Tensor]``: counts summed per log
      window and logged (per-ability expert routing).

    ``quantized_base`` says whether the method trains a quantised model (``load.quantization``).
    """

    params: type[Strict]
    prepare: Callable[[Any, Any, int], Any]
    export: Callable[[Any, Any, Path, dict | None], None]
    load_export: Callable[[Any, Any, Path], None] | None = None
    start_stage: Callable | None = None
    optimizer: Callable | None = None
    before_forward: Callable | None = None
    aux_loss: Callable | None = None
    batch_stats: Callable | None = None
    quantized_base: bool = False
    """It trains on a frozen quantised base (QLoRA): adapter methods. The others change the base's own
    weights, which in a 4-bit or 8-bit model are integers that take no gradient."""


TUNERS: Registry[Tuner] = Registry("tuning method")


def register(name: str, params: type[Strict], *, prepare: Callable, export: Callable, **hooks) -> Tuner:
    """Register a method; its citation (if any) is the ``prepare`` docstring."""
    return TUNERS.add(name, Tuner(params, prepare, export, **hooks), doc=prepare.__doc__)


def refuse_quantized(mode: str | None, method: str) -> None:
    """A model quantised as ``mode`` (``4bit`` / ``8bit``; None: not quantised) trains only under a
    method that keeps its base frozen (``quantized_base``); the recipe can be checked before loading.

    Raises:
        ConfigError: ``mode`` is set and ``method`` changes the base's own weights.
    """
    if mode is None or TUNERS.get(method).quantized_base:
        return
    adapters = " or ".join(n for n in TUNERS if TUNERS.get(n).quantized_base)
    raise ConfigError(f"train.method = {method} on a model loaded quantised ({mode}: load.quantization, or a quantised "
                      f"checkpoint): {method} changes the base's own weights, which are {mode} integers here and take "
                      f"no gradient; train an adapter on the quantised base (train.method.name: {adapters}; QLoRA), or "
                      f"load the model unquantised")


def check_dtypes(model, mixed_precision: str) -> None:
    """fp16 weights that train cannot go through fp16 mixed precision: its gradient scaler refuses fp16
    gradients (``Attempting to unscale FP16 gradients``), in transformers' Trainer as here.

    Raises:
        ConfigError: a parameter that trains is fp16 and ``mixed_precision`` is ``fp16``.
    """
    import torch

    if mixed_precision != "fp16":
        return
    half = [n for n, q in model.named_parameters() if q.requires_grad and q.dtype == torch.float16]
    if half:
        raise ConfigError(f"train.precision fp16 (mixed precision) with fp16 weights that train ({half[0]}, ...): the "
                          "gradient scaler needs fp32 weights; set load.dtype: fp32 (fp16 autocast on fp32 weights), "
                          "or train.precision: bf16 with load.dtype: bf16 where the device has bf16")


def check_share(method: str, model, *, trained: int, intended: int, of: str, low: float = 1.0, high: float = 1.0,
                why: str = "") -> float:
    """Check that a method trains the share it promises, log it, and return it.

    Args:
        method: the method's name, for the message.
        model: the prepared model (its parameter count goes in the log line).
        trained: parameters (or, for a sparse method, entries) that train.
        intended: what the share is measured against: every parameter (``full``), the adapters
            (``lora``), the block matrices (``hft``), the principal entries (``lift``).
        of: what ``intended`` counts, for the message (``block-matrix parameters``).
        low, high: the share ``trained / intended`` the method promises (1, 1: exactly all of them).
        why: the reason for the bounds, added to the error.

    Raises:
        ConfigError: the share is outside [low, high] or nothing trains: the method misread the model
            (e.g. names that match almost nothing), which must never pass silently.
    """
    total = sum(p.numel() for p in model.parameters())
    share = trained / intended if intended else 0.0
    span = f"{low:.0%}" if low == high else f"{low:.0%}-{high:.0%}" if low > 0 else f"above 0, up to {high:.0%}"
    line = (f"{method}: {trained:,} train, {share:.1%} of {intended:,} {of} (intended {span}); "
            f"{trained / max(total, 1):.2%} of the model's {total:,} parameters")
    if trained == 0 or not low - 1e-9 <= share <= high + 1e-9:
        raise ConfigError(f"{line}{'; ' + why if why else ''}")
    log.info(line)
    return share


def save_full(model, out_dir: Path, state_dict: dict | None) -> None:
    """A full Hugging Face checkpoint (every method that changes the model's own weights)."""
    model.save_pretrained(out_dir, state_dict=state_dict)


def load_full(model, params, folder: Path) -> None:
    """Load a Hugging Face folder saved by :func:`save_full` into ``model`` (every tensor it has but
    the tied ones must be there)."""
    from safetensors.torch import load_file

    saved: dict = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        saved |= load_file(str(f))
    own = model.state_dict()
    missing, unexpected = model.load_state_dict(saved, strict=False)
    loaded = {own[k].data_ptr() for k in saved if k in own}
    untied = [k for k in missing if own[k].data_ptr() not in loaded]  # a tied head shares the embedding's tensor
    if untied or unexpected:
        raise CheckpointError(f"{folder}: does not fit the model (missing {untied[:3]}, unexpected {unexpected[:3]}); "
                              "it was written by another method or recipe. Pass --fresh to train it again")
