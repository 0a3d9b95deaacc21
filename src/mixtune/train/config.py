"""The training section of a recipe. Defaults follow the DMT paper's SFT recipe
(Dong et al., 2024, arXiv:2310.05492, Sec. 3.1 and App. C) where it gives one."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mixtune.core import Strict
from mixtune.strategy import Schedule
from mixtune.train.losses import LossMode
from mixtune.train.methods import MethodConfig
from mixtune.train.methods.full import FullParams


class MaskedThought(Strict):
    """Masked Thought (Chen et al., 2024): corrupt response input tokens, keep the labels."""

    rate: float = Field(default=0.2, gt=0, le=1)
    """Final corruption rate p (official: 0.4 GSM8K Llama-2, 0.2 MATH/MetaMath)."""
    warmup: float = Field(default=0.66, gt=0, le=1)
    """The rate ramps up linearly over this share of each stage's steps (official: 0.66)."""
    mask_token: str | None = None
    """Replace with this token (it must be in the vocabulary); default: a uniformly random token, as
    the official GSM8K script does."""


class TrainEval(Strict):
    """Evaluation during training: the current weights scored per ability as the run goes."""

    every: int = Field(default=100, ge=1)
    """Global optimizer steps between evaluations; the starting model and every stage's end are
    evaluated too."""
    abilities: list[str] = Field(default=["math", "code", "general"], min_length=1)
    """Built-in abilities and task files (YAML, relative to the recipe), as ``mixtune eval --abilities``."""
    n: int = Field(default=50, ge=1)
    """Problems per ability (a task file's first ``n`` records): small, so evaluating stays cheap."""
    seed: int = 0
    """Which held-out problems (the same at every evaluation)."""
    difficulty: int = Field(default=1, ge=1, le=3)
    """Difficulty level 1-3 of the built-in abilities' problems."""
    batch_size: int = Field(default=64, ge=1)
    """Prompts per generation batch."""
    keep_best: str | None = None
    """Keep the weights that score best in ``OUT/best/``: an ability's name, or ``mean`` (the mean
    over ``abilities``, weighted by ``weights``). Off by default."""
    weights: dict[str, float] = {}
    """Weights of the abilities in ``mean`` (default 1 each)."""

    @model_validator(mode="after")
    def _best(self) -> TrainEval:
        names = [a for a in self.abilities if not a.endswith((".yaml", ".yml"))]
        files = len(names) < len(self.abilities)
        if self.keep_best not in (None, "mean") and self.keep_best not in names and not files:
            raise ValueError(f"keep_best = {self.keep_best!r} is neither 'mean' nor one of abilities "
                             f"({', '.join(self.abilities)})")
        unknown = sorted(set(self.weights) - set(names)) if not files else []
        if unknown:
            raise ValueError(f"weights names {unknown}, not in abilities ({', '.join(self.abilities)})")
        if any(w < 0 for w in self.weights.values()) or (self.weights and not sum(self.weights.values()) > 0):
            raise ValueError("weights must be >= 0 with a positive sum")
        return self


class Distributed(Strict):
    """How a multi-process launch spreads the model over its processes (see docs/training.md)."""

    strategy: Literal["ddp", "fsdp2"] = "ddp"
    """``ddp``: every process holds the whole model, gradients and optimizer state (gradients
    all-reduced). ``fsdp2``: parameters, gradients and optimizer state sharded over the processes
    (PyTorch's ``fully_shard`` per decoder layer and on the root). Under ``accelerate launch`` with an
    FSDP2 or DeepSpeed config on GPUs, accelerate shards as its config says and this is not read; it
    is how a ``torchrun`` launch (and any launch on CPU, where accelerate's FSDP plugin falls back
    to DDP) asks for FSDP2. Same losses as ``ddp`` up to summation order (tested to 1e-6)."""
    reshard_after_forward: bool = True
    """fsdp2: free each layer's gathered parameters after its forward pass and gather them again for
    the backward (least memory, like ZeRO-3); False keeps them gathered until the backward (less
    communication, more memory, like ZeRO-2)."""


class RunOptions(Strict):
    """How a run goes (logging, checkpoint cadence, evaluations during training), never
    what it trains: the same weights come out whatever these are (tests), so they are not part of
    any key that decides whether a stage is trained again (a study's stage keys hash
    :class:`TrainConfig` whole, and none of these)."""

    log_every: int = Field(default=10, ge=1)
    """Steps between log lines (loss per source, lr, grad norm, tokens/s)."""
    save_every: int = Field(default=0, ge=0)
    """Steps between resumable checkpoints (0: none; a killed run resumes after its last exported stage)."""
    keep_checkpoints: int = Field(default=1, ge=1)
    """Most checkpoints on disk (the newest); a stage's are deleted once its model is exported."""
    eval: TrainEval | None = None
    """Evaluation during training, e.g. ``{every: 50, abilities: [math, code], n: 50}``: scores per
    ability logged (``eval/<ability>`` in ``log.jsonl``) and plotted in study reports; it never
    changes the trained weights. Off by default."""
    distributed: Distributed = Distributed()
    """How several processes share the model: ``{strategy: fsdp2}`` shards it (FSDP2) where accelerate's
    launch config does not already (``torchrun``, CPU); default ``ddp``. Launching decides how many
    processes; the weights are those of one process up to float summation order."""


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
    compile: str | None = None
    """Compile the model's forward with ``torch.compile`` and this backend: ``inductor`` (fused
    kernels; the speed-up on GPUs), or another of ``torch._dynamo.list_backends()`` (``eager``,
    ``aot_eager``: tracing only, for checking). Fused kernels round differently, so a compiled run
    is its own in a study (part of the stage key). Not with objective stages (rft, dpo, grpo), whose
    generation changes shapes at every step. None: not compiled."""
    fused_loss: Literal["liger"] | None = None
    """Fused linear cross-entropy: ``liger`` computes SFT's token losses from the last hidden states
    chunk by chunk with Liger's kernel (``pip install 'mixtune[liger]'``; CUDA or XPU GPUs), never
    holding the whole logits, the memory saving for large vocabularies. It rounds differently, so a
    fused run is its own in a study (part of the stage key). Not with objective stages, nor with
    parameters sharded between steps (FSDP2, ZeRO-3). None: the logits, then cross-entropy."""
    loss: LossMode = "case1"
    """How token losses make the batch loss (MFTCoder): case1 token mean (default), case2 mean of
    examples' token means, case3 per-source token mean then mean over the sources present, case4
    per-source mean of examples' means. See docs/training.md."""
    task_weights: dict[str, float] = {}
    """Per-source weights of case3/case4 (default 1 each)."""
    rewards: dict[str, float] = {}
    """Per-source weight of every trained token (C-RLFT's class rewards, e.g. {expert: 1, other: 0.1}; default 1)."""
    masked_thought: MaskedThought | None = None
    """Masked Thought input corruption, e.g. {rate: 0.2}; off by default."""
    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict):
            moved = [k for k in RunOptions.model_fields if k in data]
            if moved:
                raise ValueError(f"{', '.join('train.' + k for k in moved)} moved to the `run` section "
                                 f"({', '.join('run.' + k for k in moved)}): how a run goes, which never changes "
                                 "what it trains")
        return data

    @model_validator(mode="after")
    def _batches(self) -> TrainConfig:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size = {self.batch_size} must be a multiple of micro_batch_size = {self.micro_batch_size}"
            )
        return self
