"""Sharding the model over processes: FSDP2 and DeepSpeed ZeRO, through accelerate where it runs.

Which engine spreads a run over its processes (:func:`choose`):

- ``accelerate launch --config_file`` an FSDP2 config (``fsdp_version: 2``, shipped as
  ``recipes/accelerate/fsdp2.yaml``) on GPUs: **accelerate's FSDP plugin** (``fully_shard`` per
  decoder layer and on the root, in ``accelerator.prepare``);
- a DeepSpeed config (``zero2.yaml``, ``zero3.yaml``): **accelerate's DeepSpeed engine**; the recipe
  sets its batch sizes, accumulation and clipping (:func:`configure_deepspeed`);
- ``run.distributed.strategy: fsdp2`` anywhere else, or an FSDP2 config launched on CPU (there
  accelerate keeps DDP without a word, shared/NOTES.md): **mixtune's own** :func:`shard`, the same
  ``fully_shard`` calls on a device mesh of all processes, made before the optimizer is built so
  that it holds the shards. ``torchrun`` launches on CPU (gloo) and on GPUs take this path;
- otherwise DDP (accelerate's ``prepare``).

Whatever shards, a stage's export is gathered whole on the main process (a Hugging Face folder, or
the peft adapter) and loads without the cluster. A resumable checkpoint stays in the engine's form:
accelerate's sharded ``save_state`` (FSDP2 plugin: torch.distributed.checkpoint folders; DeepSpeed:
its own), or for mixtune's own FSDP2 the trained weights and optimizer state gathered whole
(:class:`GatheredState`), so it resumes on any number of processes.
"""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MethodType

import torch

from mixtune.core import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"
"""The shipped accelerate configs: ``ddp.yaml``, ``fsdp2.yaml``, ``zero2.yaml``, ``zero3.yaml`` (each for 1 node
x 8 GPUs; launch flags add nodes)."""

SUPPORTED_METHODS = ("full", "lora")
"""Tuning methods that train under a sharding engine (the others' hooks and optimizers assume whole tensors)."""
OPTIMIZER_FILE = "optimizer_gathered.bin"


@dataclass(frozen=True)
class Plan:
    """How this run's processes share the model."""

    engine: str
    """``ddp``, ``fsdp2`` (mixtune's own fully_shard), ``accelerate-fsdp2`` (accelerate's plugin) or ``deepspeed``."""
    reshard_after_forward: bool = True
    zero_stage: int | None = None
    """DeepSpeed's ZeRO stage (2 or 3)."""

    @property
    def own(self) -> bool:
        """mixtune shards (own fully_shard) rather than accelerate."""
        return self.engine == "fsdp2"

    @property
    def params_sharded(self) -> bool:
        """Each process holds only a shard of every parameter between steps (FSDP2, ZeRO-3)."""
        return self.engine in ("fsdp2", "accelerate-fsdp2") or self.zero_stage == 3

    def describe(self) -> str:
        return {"fsdp2": "FSDP2 (mixtune's fully_shard)", "accelerate-fsdp2": "FSDP2 (accelerate's plugin)",
                "deepspeed": f"DeepSpeed ZeRO-{self.zero_stage}"}.get(self.engine, "DDP")


def fsdp2_from_env() -> bool:
    """``accelerate launch`` was given an FSDP2 config (it exports its keys as ``FSDP_*`` variables)."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and os.environ.get("FSDP_VERSION", "1") == "2")


def choose(acc, distributed) -> Plan:
    """The engine of this run: accelerate's when its launch config shards, else the recipe's
    ``run.distributed`` (or an FSDP2 launch config accelerate ignored on CPU) with mixtune's own FSDP2.

    Raises:
        ConfigError: accelerate runs FSDP version 1 (mixtune shards with FSDP2 only).
    """
    from accelerate.utils import DistributedType

    kind = acc.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return Plan("deepspeed", zero_stage=int(acc.state.deepspeed_plugin.zero_stage))
    if kind == DistributedType.FSDP:
        if not acc.is_fsdp2:
            raise ConfigError("the accelerate config runs FSDP version 1; mixtune shards with FSDP2: set "
                              f"fsdp_version: 2 (as the shipped {CONFIGS / 'fsdp2.yaml'})")
        return Plan("accelerate-fsdp2", reshard_after_forward=bool(acc.state.fsdp_plugin.reshard_after_forward))
    if acc.num_processes > 1 and (distributed.strategy == "fsdp2" or fsdp2_from_env()):
        reshard = distributed.reshard_after_forward
        if distributed.strategy != "fsdp2":  # the launch config's setting
            reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0")
        return Plan("fsdp2", reshard_after_forward=reshard)
    return Plan("ddp")


def check_plan(plan: Plan, method, *, objectives: bool, evaluating: bool, mixed_precision: str,
               fused_loss: str | None = None) -> None:
    """What a sharding engine does not run yet, refused before anything trains.

    Raises:
        ConfigError: an untested method, an objective stage, evaluation during training with sharded
            parameters, a LoRA merged export of sharded parameters, a fused loss with sharded parameters
            (its ``lm_head`` weight is used outside the forward), fp16 under mixtune's own FSDP2.
    """
    if plan.engine == "ddp":
        return
    where = f"run under {plan.describe()}"
    if method.name not in SUPPORTED_METHODS:
        raise ConfigError(f"train.method = {method.name} does not {where} yet (sharded: "
                          f"{', '.join(SUPPORTED_METHODS)}); train it with DDP")
    if objectives:
        raise ConfigError(f"stages with an objective (rft, dpo, grpo) do not {where} yet: train them with ddp")
    if plan.params_sharded and evaluating:
        raise ConfigError(f"run.eval (generation during training) does not {where}, whose parameters are sharded; "
                          "evaluate the exported stages with `mixtune eval` instead")
    if plan.params_sharded and getattr(method, "merge", False):
        raise ConfigError(f"train.method.merge: true does not {where} (it copies the whole model); merge the exported "
                          "adapter afterwards (`mixtune merge`, or peft's merge_and_unload)")
    if plan.params_sharded and fused_loss is not None:
        raise ConfigError(f"train.fused_loss = {fused_loss} does not {where} yet (the head's weight is sharded outside "
                          "the forward); use DDP or DeepSpeed ZeRO-2, or leave train.fused_loss unset")
    init = str(getattr(method, "options", {}).get("init_lora_weights", ""))
    if plan.params_sharded and init.startswith(("pissa", "olora")):
        raise ConfigError(f"train.method.options.init_lora_weights = {init} does not {where} (its export converts "
                          "the adapter against the whole moved base); use the default init, or ddp")
    if plan.own and mixed_precision == "fp16":
        raise ConfigError("train.precision fp16 under FSDP2 (mixtune's fully_shard) has no gradient scaler here: "
                          "use bf16 or fp32")


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules of the classes it names in ``_no_split_modules``
    (``LlamaDecoderLayer`` ...), as accelerate's ``transformer_based_wrap`` finds them."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(acc, model, plan: Plan):
    """FSDP2 by hand (mixtune's own path): ``fully_shard`` on every decoder layer, then on the
    root (embeddings, final norm, head), over a 1-D mesh of all processes; a model already sharded
    (a later stage) is returned as it is. Then the Accelerator's autocast around ``forward``, as its
    ``prepare`` would put it.

    Raises:
        ConfigError: the model names no decoder-layer class to shard by.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"run.distributed.strategy fsdp2: {type(model).__name__} names no decoder-layer classes "
                          "(_no_split_modules) to shard by; use ddp")
    model.to(acc.device)
    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)
    if acc.native_amp and not hasattr(model, "_original_forward"):
        from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

        model._original_forward = model.forward
        autocast = get_mixed_precision_context_manager(acc.native_amp, acc.autocast_handler)
        model.forward = MethodType(convert_outputs_to_fp32(autocast(model.forward.__func__)), model)
    return model


def configure_deepspeed(acc, batch_size: int, micro_batch_size: int, max_grad_norm: float | None) -> None:
    """The recipe's global batch, micro-batch, accumulation and clipping into DeepSpeed's config
    (they replace the config file's values: the recipe decides what trains)."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds["gradient_accumulation_steps"] = batch_size // (micro_batch_size * acc.num_processes)
    ds["train_batch_size"] = batch_size
    ds["gradient_clipping"] = max_grad_norm or 0.0
    ds["zero_allow_untested_optimizer"] = True  # the loop's own torch AdamW, wrapped by ZeRO


def loss_factor(acc, accum: int) -> int:
    """What a micro-batch's loss is multiplied by before ``acc.backward``: DeepSpeed divides it by
    its accumulation steps, which mixtune's loss (already the global batch's share) must not be."""
    from accelerate.utils import DistributedType

    return accum if acc.distributed_type == DistributedType.DEEPSPEED else 1


@contextmanager
def micro_batch(acc, model, *, last: bool):
    """Around one micro-batch's forward and backward: gradients are reduced over the processes only
    on the ``last`` micro-batch of a step (DDP's ``no_sync`` before it; FSDP2's
    ``set_requires_gradient_sync``; DeepSpeed's accumulation boundary, where it also steps)."""
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FSDPModule

    bare = acc.unwrap_model(model)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        acc.gradient_state._set_sync_gradients(last)
        try:
            yield
        finally:
            acc.gradient_state._set_sync_gradients(True)
    elif isinstance(bare, FSDPModule):  # accelerate's plugin or mixtune's own
        bare.set_requires_gradient_sync(last)
        yield
    elif last:
        yield
    else:
        with acc.no_sync(model):
            yield


def numel(p: torch.Tensor) -> int:
    """A parameter's full size (ZeRO-3 leaves an empty placeholder and keeps it as ``ds_numel``)."""
    return int(getattr(p, "ds_numel", p.numel()))


def full_state_dict(acc, model) -> dict:
    """The model's whole state dict on the main process (empty elsewhere) whatever shards it: for
    mixtune's own FSDP2 gathered with ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``;
    otherwise accelerate's ``get_state_dict`` (which gathers its FSDP2 and ZeRO-3 the same way)."""
    from torch.distributed.fsdp import FSDPModule

    bare = acc.unwrap_model(model)
    if isinstance(bare, FSDPModule) and not acc.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(bare, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # a tied weight (lm_head = embed_tokens) comes back as a second tensor: drop it, as DDP's export does
        tied = {n for n, _ in bare.named_parameters(remove_duplicate=False)} - {n for n, _ in bare.named_parameters()}
        return {k: v for k, v in full.items() if k not in tied}
    return acc.get_state_dict(model)


class GatheredState:
    """A stage's checkpoint part under mixtune's own FSDP2, which accelerate's ``save_state`` does not
    know: the weights that train, gathered whole into ``model.safetensors`` (as a DDP checkpoint
    holds them), and the optimizer state gathered whole and keyed by parameter name
    (``optimizer_gathered.bin``, torch.distributed.checkpoint's full optimizer state dict). Written by
    the main process inside accelerate's ``save_state`` (a pre-hook, while the stage runs); read by
    every process, so it resumes on any number of processes."""

    def __init__(self, acc, model, optimizer) -> None:
        self.model, self.optimizer, self.acc = model, optimizer, acc
        ref = weakref.ref(self)

        def hook(models, weights, output_dir) -> None:  # a weak reference: a finished stage saves nothing
            me = ref()
            if me is not None:
                me.save(Path(output_dir))

        self.handle = acc.register_save_state_pre_hook(hook)

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        weights = get_model_state_dict(self.model, options=self._options())  # collective: every process
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=self._options())
        if self.acc.is_main_process:
            keep = {n for n, p in self.model.named_parameters() if p.requires_grad}
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in weights.items() if k in keep}, str(folder / "model.safetensors"))
            torch.save(optim, folder / OPTIMIZER_FILE)

    def load(self, folder: Path) -> None:
        """Put a checkpoint's trained weights and optimizer state back (every process reads it whole
        and keeps its shard)."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        from mixtune.core import CheckpointError

        if not (folder / OPTIMIZER_FILE).exists():
            raise CheckpointError(f"{folder}: has no {OPTIMIZER_FILE}, so it was not written by an FSDP2 run "
                                  "(run.distributed.strategy: fsdp2); resume it with the strategy that wrote it, "
                                  "or pass --fresh to train from the start")
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, load_file(str(folder / "model.safetensors")), options=opts)
        optim = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.model, self.optimizer, optim, options=StateDictOptions(full_state_dict=True))

    def close(self) -> None:
        self.handle.remove()


def config_path(name: str) -> Path:
    """A shipped accelerate config by name (``fsdp2``, ``zero3`` ...).

    Raises:
        ConfigError: no shipped config has that name.
    """
    path = CONFIGS / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        raise ConfigError(f"no shipped accelerate config {name!r}; shipped: "
                          f"{', '.join(sorted(p.stem for p in CONFIGS.glob('*.yaml')))}")
    return path


if __name__ == "__main__":  # `python -m mixtune.train.sharding fsdp2` prints the config's path
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m mixtune.train.sharding NAME  (" +
                 ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml"))) + ")")
    try:
        print(config_path(sys.argv[1]))
    except ConfigError as e:
        sys.exit(str(e))
