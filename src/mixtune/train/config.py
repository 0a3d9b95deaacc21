"""The training section of a recipe. Defaults follow the DMT paper's SFT recipe
(Dong et al., 2024, arXiv:2310.05492, Sec. 3.1 and App. C) where it gives one."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mixtune.core import Strict
from mixtune.strategy import Schedule
from mixtune.train.methods import MethodConfig
from mixtune.train.methods.full import FullParams


class TrainConfig(Strict):
    """How every stage is trained (a stage may override its length, lr and schedule)."""

    method: MethodConfig = FullParams()
    """Tuning method and its parameters, e.g. ``{name: lora, r: 8}`` (``mixtune list`` shows all)."""
    lr: float = Field(default=2e-5, gt=0)
    """Peak learning rate (paper: 2e-5 for LLaMA 7-33B; tiny models from scratch want ~1e-3)."""
    schedule: Schedule = "cosine"
    """Learning-rate decay after warmup, restarted at every stage."""
    warmup: float = Field(default=0.03, ge=0, lt=1)
    """Share of each stage's steps spent warming up linearly from 0 (paper: 3%)."""
    epochs: float = Field(default=3.0, gt=0)
    """Passes over each stage's data unless the stage or ``steps`` says otherwise (paper: 3)."""
    steps: int | None = Field(default=None, ge=1)
    """Optimizer steps per stage; overrides ``epochs``."""
    batch_size: int = Field(default=16, ge=1)
    """Packed rows per optimizer step, over all processes (the global batch)."""
    micro_batch_size: int = Field(default=16, ge=1)
    """Packed rows per forward pass on one process; gradient accumulation makes up the rest."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this (None: no clipping)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on GPUs that have it (else fp16), bf16 on CPUs with native bf16, else fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    log_every: int = Field(default=10, ge=1)
    """Steps between log lines (loss per source, lr, grad norm, tokens/s)."""
    save_every: int = Field(default=0, ge=0)
    """Steps between resumable checkpoints (0: only at stage ends)."""
    keep_checkpoints: int = Field(default=1, ge=1)
    """Resumable checkpoints kept on disk (the newest)."""

    @model_validator(mode="after")
    def _batches(self) -> TrainConfig:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size = {self.batch_size} must be a multiple of micro_batch_size = {self.micro_batch_size}"
            )
        return self
