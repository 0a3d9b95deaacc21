"""THE training loop: stages in order, steps, logging, checkpoints, resume. Runs on ``accelerate``.

Read top to bottom: :func:`train` prepares the model with the tuning method, then for each stage
builds a fresh AdamW and schedule (each stage is a full SFT run, as in the DMT paper), runs its
steps (writing a resumable checkpoint every ``save_every``) and exports the stage's model.

**Loss.** Each trained token of the *whole global batch* gets a weight before the forward passes
(:func:`~mixtune.train.losses.token_weights`: 1 / trained tokens for the default token mean;
MFTCoder's per-task cases and C-RLFT rewards otherwise), and every micro-batch contributes its
tokens' weighted losses (times the number of processes, which DDP divides back out). The
gradient of a step is therefore exactly the global batch's loss, whatever the micro-batch size,
gradient accumulation or number of processes.

**Objectives.** A stage with an ``objective`` (rft, dpo, grpo: :mod:`mixtune.train.post_sft`)
prepares from its starting weights (samples, pairs, a frozen reference) and then asks its own runner
for each step's gradients; the optimizer, schedule, checkpoints, resume and logging below are the same.

**Data order** is a function of (seed, stage, step) only: the stage's mixing mode
(:mod:`mixtune.strategy.mixing`; ``shuffled`` without ``mixing``: one seeded permutation of the rows
per epoch) chooses each step's rows, may ask for validation losses and may reweight the loss, and
the RNG is reseeded at every stage start; every stream is a named one (:mod:`mixtune.core.seeds`),
indexed by the stage's position in the whole run. A run resumes after
its last exported stage, or from a newer checkpoint inside the next one; there the step counter
says where the data is, and trained weights, optimizer, scheduler and RNG state come back through
``accelerator.load_state`` (:mod:`mixtune.train.checkpoint`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mixtune.core import ConfigError, atomic_write_text
from mixtune.core.seeds import seed_int, torch_generator
from mixtune.data.format import Packed
from mixtune.models.quantize import is_quantized
from mixtune.strategy import Schedule
from mixtune.strategy.mixing import Groups, Mixer, MixingConfig, StageRows, make_mixer
from mixtune.train.checkpoint import (Progress, check_checkpoint, drop_checkpoints, export_stage, resume_point,
                                      save_checkpoint, start_over)
from mixtune.train.config import RunOptions, TrainConfig
from mixtune.train.evaluation import DuringTraining, Scorer
from mixtune.train.fused_loss import FusedTokenLosses, check_fused_loss
from mixtune.train.losses import (LossMode, mask_thought, masked_thought_rate, per_source, token_losses,
                                  token_weights)
from mixtune.train.methods import TUNERS
from mixtune.train import sharding
from mixtune.train.methods.base import check_dtypes, load_full, refuse_quantized
from mixtune.strategy.objectives import DpoParams, GrpoParams, ObjectiveConfig, RftParams

ROW_FIELDS = ("input_ids", "labels", "position_ids", "source_ids")


@dataclass(frozen=True)
class StageData:
    """One stage, ready to train: its packed rows and resolved length and schedule."""

    name: str
    packed: Packed
    steps: int
    lr: float
    schedule: Schedule
    mixing: MixingConfig | None = None
    """The stage's mixing mode (None: ``shuffled``)."""
    groups: Groups | None = None
    """Grouped mixing modes: the stage's sources packed apart, with validation rows."""
    recipe_text: str = ""
    """The recipe that trains this stage (YAML), written beside its checkpoints and export and compared
    on resume: a study writes the same text for a stage every run that shares it trains."""
    objective: ObjectiveConfig | None = None
    """What the stage trains for after SFT (:mod:`mixtune.strategy.objectives`; None: SFT on ``packed``)."""
    records: tuple[dict, ...] = ()
    """An objective stage's records (its prompts, pairs, gold replies), in mixture order."""
    record_sources: tuple[int, ...] = ()
    """The source id of each of ``records``."""


def stage_steps(n_rows: int, cfg: TrainConfig, *, steps: int | None, epochs: float | None) -> int:
    """Optimizer steps of a stage: explicit steps, else ceil(epochs x rows / batch_size)."""
    if steps or cfg.steps:
        return steps or cfg.steps  # type: ignore[return-value]
    return max(1, math.ceil((epochs or cfg.epochs) * n_rows / cfg.batch_size))


@torch.no_grad()
def batch_losses(model, batch: dict, micro: int, n_sources: int, acc) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-source token-loss sums and counts of a global batch under ``model`` (no gradients)."""
    sums = torch.zeros(n_sources, dtype=torch.float64)
    counts = torch.zeros(n_sources, dtype=torch.float64)
    for lo in range(0, batch["input_ids"].shape[0], micro):
        part = {k: v[lo:lo + micro].to(acc.device) for k, v in batch.items()}
        logits = model(input_ids=part["input_ids"], position_ids=part["position_ids"], use_cache=False).logits
        s, c = per_source(token_losses(logits, part["labels"]).cpu(), part["labels"].cpu(), part["source_ids"].cpu(),
                          n_sources)
        sums += s
        counts += c
    return sums, counts


@torch.no_grad()
def validation_losses(model, val: list[Packed], acc) -> np.ndarray:
    """Mean token loss of each group's validation rows (the model is put back in training mode)."""
    model.eval()
    out = []
    for packed in val:
        rows = {k: getattr(packed, k) for k in ROW_FIELDS}
        sums, counts = batch_losses(model, rows, 16, int(packed.source_ids.max()) + 1, acc)
        out.append(float(sums.sum() / counts.sum().clamp(min=1)))
    model.train()
    return np.array(out)


def compile_model(model, backend: str, *, objectives: bool) -> None:
    """``model.compile(backend=backend)`` in place (its parameters and saved names unchanged), for
    ``train.compile``; a backend torch does not know, or objective stages, are a ConfigError."""
    import torch._dynamo

    if objectives:
        raise ConfigError("train.compile: not with objective stages (rft, dpo, grpo): their sampling changes "
                          "shapes every step; leave train.compile unset for them")
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(f"train.compile = {backend!r}: torch.compile knows {', '.join(sorted(known))}")
    model.compile(backend=backend)


def resolve_precision(precision: str) -> str:
    """``auto`` -> bf16 on GPUs with bf16 (else fp16) and on CPUs with native bf16, else no."""
    if precision == "fp32":
        return "no"
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:  # without AVX512-BF16/AMX, CPU bf16 is emulated and slower than fp32
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:
        native = False
    return "bf16" if native else "no"


def make_accelerator(precision: str):
    """One Accelerator per process. On CPU it must be built with ``cpu=True``: otherwise several
    launched processes never synchronise gradients (shared/NOTES.md)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed = resolve_precision(precision)
    if AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:
        # an earlier run in this process chose another precision (accelerate's state is one per process and
        # refuses a change): start it afresh, keeping the process group
        AcceleratorState._reset_state()
    # Schedules count global optimizer steps. By default accelerate steps a prepared scheduler once
    # per process per optimizer step (it assumes per-process lengths), which would make the learning
    # rate decay N times too fast on N processes.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed, step_scheduler_with_optimizer=False)


def train(model, tokenizer, stages: list[StageData], cfg: TrainConfig, out_dir: Path, *, source_names: list[str],
          options: RunOptions = RunOptions(), seed: int = 0, accelerator=None, resume: bool = True,
          progress: bool = True,
          on_step: Callable[[int], None] | None = None, first_stage: int = 0, known: int = 0,
          evaluator: Scorer | None = None) -> list[Path]:
    """Train ``model`` through ``stages``; returns the folders of the exported stage models.

    Args:
        model: a causal LM (a Hugging Face model).
        tokenizer: saved beside every exported model.
        stages: stages in order.
        cfg: the training section of the recipe (what decides the weights).
        options: how the run goes (logging, checkpoints, evaluations during training): never the weights.
        out_dir: ``log.jsonl``, ``stages/<name>/`` (exported models) and ``checkpoints/`` (with ``save_every``).
        source_names: names of the source ids in the packed rows, for per-source loss.
        seed: seeds data order, dropout and method randomness.
        accelerator: an ``accelerate.Accelerator`` (default: :func:`make_accelerator`).
        resume: continue after the last stage exported in ``out_dir``, or from a newer checkpoint;
            otherwise the stages and checkpoints there are deleted first.
        progress: show a progress bar (on the main process).
        on_step: called with the global step after every optimizer step.
        first_stage: the position of ``stages[0]`` in the whole run, when a run is trained one
            stage per call (a study): every per-stage random stream (data order, online mixing,
            Masked Thought, methods that re-select per stage such as HFT, the stage's seed) is
            indexed by the stage's position in the whole run, so a stage trains the same either way.
        known: how many leading ``stages`` the caller knows are exported (a graph node's earlier
            stages, :class:`mixtune.pipeline.TrainNode`): resuming after them is expected, not announced.
        evaluator: with ``options.eval``, scores a model per ability (:mod:`mixtune.train.evaluation`;
            ``mixtune.eval.during_training`` builds it).
    """
    from accelerate.utils import set_seed

    acc = accelerator or make_accelerator(cfg.precision)
    set_seed(seed)
    out_dir = Path(out_dir)
    tuner, params = TUNERS.get(cfg.method.name), cfg.method
    rule = LossRule.of(cfg, acc.num_processes, source_names, tokenizer)
    plan = sharding.choose(acc, options.distributed)  # DDP, FSDP2 (accelerate's or mixtune's own) or DeepSpeed
    objectives = any(st.objective is not None for st in stages)
    sharding.check_plan(plan, cfg.method, objectives=objectives,
                        evaluating=options.eval is not None, mixed_precision=acc.mixed_precision,
                        fused_loss=cfg.fused_loss)
    if options.eval is not None and evaluator is None:
        raise ConfigError("run.eval is set but nothing scores the model: pass an evaluator "
                          "(mixtune.eval.during_training builds one)")

    # 1) the method decides what trains (on a quantised model only adapters), in the dtype it was loaded in
    refuse_quantized(is_quantized(model), params.name)
    model = tuner.prepare(model, params, seed)
    check_dtypes(model, acc.mixed_precision)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile is not None:
        compile_model(model, cfg.compile, objectives=objectives)
    if cfg.fused_loss is not None:
        check_fused_loss(cfg.fused_loss, acc.device, objectives=objectives)
    log = TrainLog(out_dir / "log.jsonl", enabled=acc.is_main_process, echo=progress)

    # 2) resume where a previous run stopped: after its last exported stage, or from a newer checkpoint
    names, lengths = [st.name for st in stages], [st.steps for st in stages]
    if resume:
        at, ckpt = resume_point(acc, out_dir, names, lengths, options.keep_checkpoints, log,
                                 [st.recipe_text for st in stages], known)
    else:
        start_over(acc, out_dir, names, log)
        at, ckpt = Progress(), None
    if 0 < at.stage < len(stages):  # the last export holds what trained so far (a checkpoint adds the stage's part)
        (tuner.load_export or load_full)(model, params, out_dir / "stages" / stages[at.stage - 1].name)
    evals = (DuringTraining(options.eval, evaluator, acc=acc, log=log, tokenizer=tokenizer, out_dir=out_dir)
             if options.eval is not None else None)

    exported = []
    for s, stage in enumerate(stages):
        if s < at.stage:
            exported.append(out_dir / "stages" / stage.name)
            continue
        # 3) what trains in this stage (a method may re-select it), a fresh optimizer and schedule; the
        # stage's mixing mode chooses every batch's rows and may reweight the loss
        index = first_stage + s
        model, optimizer, scheduler, trainable = start_stage(acc, model, tuner, params, stage, cfg, seed, index, log,
                                                             plan)
        gathered = sharding.GatheredState(acc, model, optimizer) if plan.own else None  # accelerate saves the rest
        set_seed(seed_int(seed, "stage", index))  # so a stage resumed from an export runs as it did
        # an objective's start, from the stage's starting weights (a checkpoint is restored after it)
        stage, prepared, n_rows, per_step = start_objective(acc, model, tokenizer, stage, cfg, seed, index, out_dir,
                                                            log)
        mixer = make_mixer(stage.mixing, StageRows(n_rows, per_step, seed, index, stage.groups))
        start = 0
        if ckpt is not None and s == at.stage:
            check_checkpoint(ckpt, model)
            acc.load_state(str(ckpt), strict=False)  # it holds only the weights that train (and the RNG state)
            if gathered is not None:
                gathered.load(ckpt)
            if (ckpt / "mixer.json").exists():
                mixer.load_state_dict(json.loads((ckpt / "mixer.json").read_text()))
            start = at.step
        runner = make_runner(acc, model, cfg, rule, tuner, stage, source_names, mixer, tokenizer, seed=seed,
                             index=index, prepared=prepared, log=log)
        bar = StageBar(stage.name, stage.steps, start, enabled=progress and acc.is_main_process)

        def export_best(dest: Path, best: dict) -> None:
            export_stage(acc, model, tokenizer, tuner, params, dest, stage.recipe_text,
                         extra={"best.json": json.dumps(best, indent=2)})

        # the starting model; a later stage's start is the end of the one before, evaluated there (also
        # when that stage was trained by an earlier call: a resume, a study's node, an earlier segment)
        if evals is not None and start == 0 and at.global_step == 0 and first_stage == 0:
            evals.maybe(model, global_step=at.global_step, stage=stage.name, stage_step=0, stage_end=False,
                        export=export_best)
        for step in range(start, stage.steps):
            # 4) one optimizer step: the runner's gradients of the step's global batch (SFT on the rows the
            # mixer chose, or an objective's pairs or sampled groups), then what the mixer observes
            tokens = runner.step(step)
            grad_norm = acc.clip_grad_norm_(trainable, cfg.max_grad_norm) if cfg.max_grad_norm else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            at = Progress(stage=s, step=step + 1, global_step=at.global_step + 1)
            runner.after(step)
            bar.advance(tokens)

            # 5) log, evaluate, checkpoint
            if at.step % options.log_every == 0 or at.step == stage.steps:
                entry = runner.log_entry(step, at, scheduler.get_last_lr()[0], grad_norm)
                log.write(entry)
                bar.show_loss(entry["loss"])
            if evals is not None:
                evals.maybe(model, global_step=at.global_step, stage=stage.name, stage_step=at.step,
                            stage_end=at.step == stage.steps, export=export_best)
            if options.save_every and at.global_step % options.save_every == 0 and at.step < stage.steps:
                save_checkpoint(acc, out_dir, at, options.keep_checkpoints, stage.recipe_text,
                                mixer=mixer.state_dict())
            if on_step is not None:
                on_step(at.global_step)
        bar.close()
        # 6) the stage's model, in the form the ecosystem loads; it supersedes the stage's checkpoints
        if summary := mixer.summary():  # e.g. Aioli's rounds, DoReMi's averaged weights
            log.write({"stage": stage.name} | summary)
        exported.append(export_stage(acc, model, tokenizer, tuner, params, out_dir / "stages" / stage.name,
                                         stage.recipe_text))
        drop_checkpoints(acc, out_dir, at.global_step, options.keep_checkpoints)
        if gathered is not None:
            gathered.close()
    return exported


@dataclass(frozen=True)
class LossRule:
    """How a global batch's token losses become its loss: the recipe's loss mode, per-source task
    weights and rewards (:func:`~mixtune.train.losses.token_weights`), the accumulation that makes
    up the batch, and Masked Thought's mask token."""

    mode: LossMode
    task_weights: torch.Tensor | None
    rewards: torch.Tensor | None
    accum: int
    n_sources: int
    mask_id: int | None = None

    @classmethod
    def of(cls, cfg: TrainConfig, world: int, source_names: list[str], tokenizer) -> LossRule:
        """The recipe's rule; raises :class:`ConfigError` for settings that do not fit the sources,
        tokenizer or number of processes."""
        if cfg.batch_size % (cfg.micro_batch_size * world):
            raise ConfigError(f"train.batch_size = {cfg.batch_size} must be a multiple of micro_batch_size x "
                              f"processes = {cfg.micro_batch_size} x {world}")
        by_source = {}
        for field in ("task_weights", "rewards"):
            given = getattr(cfg, field)
            unknown = set(given) - set(source_names)
            if unknown:
                raise ConfigError(f"train.{field} names {sorted(unknown)}, not sources ({', '.join(source_names)})")
            by_source[field] = torch.tensor([given.get(n, 1.0) for n in source_names]) if given else None
        mask_id = None
        if cfg.masked_thought is not None and cfg.masked_thought.mask_token is not None:
            mask_id = tokenizer.convert_tokens_to_ids(cfg.masked_thought.mask_token)
            if mask_id is None or mask_id == tokenizer.unk_token_id:
                raise ConfigError(f"train.masked_thought.mask_token {cfg.masked_thought.mask_token!r} is not in the "
                                  "tokenizer's vocabulary")
        return cls(cfg.loss, by_source["task_weights"], by_source["rewards"],
                   cfg.batch_size // (cfg.micro_batch_size * world), len(source_names), mask_id)

    def weights(self, batch: dict, examples: torch.Tensor, mixed: np.ndarray | None,
                group_ids: torch.Tensor | None) -> torch.Tensor:
        """Each trained token's weight; with a mixing mode's per-group weights w (DoReMi, CoBa) the
        loss is sum_i w_i x (group i's mean token loss), MFTCoder's case3 with task weights w."""
        mode, task_w = self.mode, self.task_weights
        if mixed is not None:
            mode, task_w = "case3", torch.zeros(self.n_sources, dtype=torch.float64)
            task_w[group_ids] = torch.from_numpy(mixed)
        return token_weights(batch["labels"], batch["source_ids"], examples, mode, task_w, self.rewards).float()


def start_stage(acc, model, tuner, params, stage: StageData, cfg: TrainConfig, seed: int, index: int, log,
                plan: sharding.Plan = sharding.Plan("ddp")):
    """A stage's start: the method's re-selection (HFT), its optimizer (AdamW unless the method
    brings one) and schedule, prepared by accelerate; logs what trains. Under mixtune's own FSDP2
    the model is sharded before the optimizer is built (it holds the shards) and accelerate
    prepares only the schedule (:mod:`mixtune.train.sharding`).

    Returns:
        (prepared model, optimizer, scheduler, the trainable parameters).
    """
    from transformers import get_scheduler

    bare = acc.unwrap_model(model)
    if tuner.start_stage is not None:
        tuner.start_stage(bare, params, seed, index)
    if plan.own:
        bare = sharding.shard(acc, bare, plan)
    trainable = [p for p in bare.parameters() if p.requires_grad]
    if tuner.optimizer is not None:
        optimizer = tuner.optimizer(bare, params, stage.lr, cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=cfg.weight_decay)
    n_all = sum(sharding.numel(p) for p in bare.parameters())
    n_train = (optimizer.trainable_entries() if hasattr(optimizer, "trainable_entries")  # sparse: entries, not tensors
               else sum(sharding.numel(p) for p in trainable))
    state = optimizer.state_bytes() if hasattr(optimizer, "state_bytes") else 8 * n_train  # AdamW: 2 fp32 moments
    world = acc.num_processes
    log.note(f"stage {stage.name}: method {params.name}, {n_train:,} of {n_all:,} parameters train "
             f"({n_train / n_all:.2%}); optimizer state {state / 2**20:.2f} MiB; precision {acc.mixed_precision}; "
             f"{world} process(es), accumulation {cfg.batch_size // (cfg.micro_batch_size * world)}"
             + (f"; sharded by {plan.describe()}" if plan.engine != "ddp" else ""))
    log.write({"stage": stage.name, "trainable_params": n_train, "total_params": n_all, "optimizer_bytes": state})
    scheduler = get_scheduler("constant_with_warmup" if stage.schedule == "constant" else stage.schedule,
                              optimizer, num_warmup_steps=round(cfg.warmup * stage.steps),
                              num_training_steps=stage.steps)
    acc.free_memory()  # forget the previous stage's optimizer so save_state holds this one
    if plan.own:  # accelerate would wrap the sharded model in DDP
        return bare, optimizer, acc.prepare(scheduler), trainable
    if plan.engine == "deepspeed":
        sharding.configure_deepspeed(acc, cfg.batch_size, cfg.micro_batch_size, cfg.max_grad_norm)
    model, optimizer, scheduler = acc.prepare(bare, optimizer, scheduler)
    trainable = [p for p in acc.unwrap_model(model).parameters() if p.requires_grad]  # FSDP2 made new ones
    return model, optimizer, scheduler, trainable


def start_objective(acc, model, tokenizer, stage: StageData, cfg: TrainConfig, seed: int, index: int, out_dir: Path,
                    log) -> tuple[StageData, object, int, int]:
    """What an objective stage prepares from its starting weights (:mod:`mixtune.train.post_sft`):
    rft's sampled rows (the stage then trains as SFT on them), dpo's pairs with their reference
    log-probabilities, grpo's frozen reference. Returns the stage (rft: with its new rows), what
    the runner needs, and the rows (or pairs, or prompts) the mixer draws from and how many a step takes."""
    from mixtune.train import post_sft

    p = stage.objective
    if p is not None:
        post_sft.check_processes(p, cfg, acc.num_processes)
    bare = acc.unwrap_model(model)
    kw = dict(acc=acc, seed=seed, index=index, out_dir=out_dir, log=log)
    if isinstance(p, RftParams):
        import dataclasses

        stage = dataclasses.replace(stage, packed=post_sft.rft_rows(stage, p, bare, tokenizer, **kw))
    elif isinstance(p, DpoParams):
        pairs = post_sft.preference_pairs(stage, p, bare, tokenizer, **kw)
        return stage, pairs, len(pairs.chosen), cfg.batch_size
    elif isinstance(p, GrpoParams):
        from mixtune.train.rollouts import check_rewardable

        check_rewardable(stage.records, stage.name, p.reward)
        reference = post_sft.frozen_copy(bare) if p.beta > 0 else None
        return stage, reference, len(stage.records), p.prompts
    return stage, None, stage.packed.input_ids.shape[0], cfg.batch_size


def make_runner(acc, model, cfg: TrainConfig, rule: LossRule, tuner, stage: StageData, source_names: list[str],
                mixer: Mixer, tokenizer, *, seed: int, index: int, prepared, log):
    """The stage's step runner: SFT's :class:`StepRunner`, or an objective's (:mod:`mixtune.train.post_sft`)."""
    from mixtune.train import post_sft

    p = stage.objective
    if isinstance(p, DpoParams):
        return post_sft.PreferenceRunner(acc, model, cfg, p, prepared, mixer, tokenizer, stage, source_names)
    if isinstance(p, GrpoParams):
        return post_sft.GrpoRunner(acc, model, cfg, p, mixer, tokenizer, stage, source_names, seed=seed, index=index,
                                   reference=prepared, log=log)
    return StepRunner(acc, model, cfg, rule, tuner, stage, source_names, mixer, seed=seed, index=index)


class StepRunner:
    """The parts of one stage's optimizer step that need the model: the forward and backward passes
    over the micro-batches, and the losses the stage's mixer asks for (validation losses, DoReMi's
    reference losses on the batch). Owns the stage's log window."""

    def __init__(self, acc, model, cfg: TrainConfig, rule: LossRule, tuner, stage: StageData,
                 source_names: list[str], mixer: Mixer, *, seed: int = 0, index: int = 0) -> None:
        self.acc, self.model, self.cfg, self.rule, self.tuner = acc, model, cfg, rule, tuner
        self.stage, self.source_names, self.mixer, self.seed, self.index = stage, source_names, mixer, seed, index
        self._last = None
        self.group_ids = (torch.tensor([source_names.index(g) for g in stage.groups.names])
                          if stage.groups is not None else None)
        self.reference = None
        if mixer.reference is not None:  # the fixed model DoReMi measures excess loss against
            from mixtune.models import load_model

            self.reference = load_model(mixer.reference)[0].to(acc.device).eval()
        # Liger's fused cross-entropy (train.fused_loss), else the logits then cross-entropy
        self.fused = FusedTokenLosses(acc.unwrap_model(model)) if cfg.fused_loss is not None else None
        model.train()
        self.window = Window(len(source_names))

    def step(self, step: int) -> int:
        """The gradients of ``step``'s global batch (the rows the mixer chose, their token weights, Masked
        Thought's corruption); returns the real tokens of the global batch."""
        cfg, stage, rule = self.cfg, self.stage, self.rule
        self.validate(step, after=False)
        rows = self.mixer.rows(step)
        batch = {k: getattr(stage.packed, k)[rows] for k in ROW_FIELDS}
        weights = rule.weights(batch, stage.packed.example_ids[rows], self.mixer.loss_weights(), self.group_ids)
        if cfg.masked_thought is not None:
            mt = cfg.masked_thought
            batch["input_ids"] = mask_thought(batch["input_ids"], batch["labels"],
                                              masked_thought_rate(step, stage.steps, mt.rate, mt.warmup),
                                              torch_generator(self.seed, "masked-thought", self.index, step),
                                              vocab_size=self.acc.unwrap_model(self.model).config.vocab_size,
                                              mask_id=rule.mask_id)
        sums, counts = self.forward_backward(batch, weights)
        self._last = (batch, sums, counts)
        tokens = int((stage.packed.example_ids[rows] >= 0).sum())  # real tokens in the global batch
        self.window.tokens += tokens
        self.window.steps += self.tuner.aux_loss is not None
        return tokens

    def after(self, step: int) -> None:
        """What the mixer observes once the step's update is made."""
        self.observe_batch(step, *self._last)
        self.validate(step, after=True)

    def forward_backward(self, batch: dict, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's micro-batches of the global batch, forward and backward (gradients synchronised
        on the last); returns this process's per-source token-loss sums and counts."""
        acc, cfg, tuner, model, world = self.acc, self.cfg, self.tuner, self.model, self.acc.num_processes
        n, accum, window = self.rule.n_sources, self.rule.accum, self.window
        # DDP, FSDP2 and DeepSpeed average gradients over processes; DeepSpeed also divides by its accumulation
        scale = world * sharding.loss_factor(acc, accum)
        step_sums = torch.zeros(n, dtype=torch.float64)
        step_counts = torch.zeros(n, dtype=torch.float64)
        for g in range(accum):
            first = (g * world + acc.process_index) * cfg.micro_batch_size
            mb = {k: v[first:first + cfg.micro_batch_size].to(acc.device) for k, v in batch.items()}
            mb_weights = weights[first:first + cfg.micro_batch_size].to(acc.device)
            if tuner.before_forward is not None:
                tuner.before_forward(acc.unwrap_model(model), mb)
            with sharding.micro_batch(acc, model, last=g == accum - 1):
                if self.fused is None:
                    logits = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits
                    ce = token_losses(logits, mb["labels"])  # (m, L-1)
                else:
                    ce = self.fused(model, mb)
                loss = (ce * mb_weights).sum() * scale  # the global batch's loss, in this micro-batch's share
                if tuner.aux_loss is not None:  # e.g. a router's load balance, averaged over micro-batches
                    aux = tuner.aux_loss(acc.unwrap_model(model))
                    if aux is not None:
                        loss = loss + aux / accum
                        window.aux += float(aux.detach()) / accum
                acc.backward(loss)
            sums, counts = per_source(ce.detach().cpu(), mb["labels"].cpu(), mb["source_ids"].cpu(), n)
            window.add(sums, counts)
            step_sums += sums
            step_counts += counts
            if tuner.batch_stats is not None:
                window.add_stats(tuner.batch_stats(acc.unwrap_model(model), mb["source_ids"].cpu(), n))
        return step_sums, step_counts

    def validate(self, step: int, *, after: bool) -> None:
        """The groups' validation losses to the mixer, when it wants them before or after ``step``."""
        if self.mixer.wants_validation(step, after=after):
            self.mixer.observe(step, validation_losses(self.model, self.stage.groups.val, self.acc), after=after)

    def observe_batch(self, step: int, batch: dict, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """With a mixer's reference model: each group's mean loss on the step's batch under the model
        (summed over processes) and under the reference."""
        if self.reference is None:
            return
        acc, n = self.acc, self.rule.n_sources
        if acc.num_processes > 1:  # this process saw only its micro-batches
            sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu()
            counts = acc.reduce(counts.to(acc.device), reduction="sum").cpu()
        ref_sums, ref_counts = batch_losses(self.reference, batch, self.cfg.micro_batch_size, n, acc)
        self.mixer.observe_batch(step, (sums / counts)[self.group_ids].numpy(),
                                 (ref_sums / ref_counts)[self.group_ids].numpy())

    def log_entry(self, step: int, at: Progress, lr: float, grad_norm) -> dict:
        """The log line: losses per source over the window, lr, grad norm, the mixer's entries and, at
        the end of a grouped stage, each group's validation loss."""
        entry = self.window.flush(self.acc, self.source_names)
        entry |= {"step": at.global_step, "stage": self.stage.name, "stage_step": at.step, "lr": lr,
                  "grad_norm": float(grad_norm) if grad_norm is not None else None}
        entry |= self.mixer.log(step)
        if self.stage.groups is not None and at.step == self.stage.steps:
            val = validation_losses(self.model, self.stage.groups.val, self.acc)
            entry |= {f"val_loss/{g}": float(v) for g, v in zip(self.stage.groups.names, val)}
        return entry


class Window:
    """Loss sums per source since the last log line."""

    def __init__(self, n_sources: int) -> None:
        self.sums = torch.zeros(n_sources, dtype=torch.float64)
        self.counts = torch.zeros(n_sources, dtype=torch.float64)
        self.tokens, self.t0, self.aux, self.steps = 0, time.perf_counter(), 0.0, 0
        self.stats: dict[str, torch.Tensor] = {}

    def add(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        self.sums += sums
        self.counts += counts

    def add_stats(self, stats: dict[str, torch.Tensor]) -> None:
        for k, v in stats.items():
            self.stats[k] = self.stats[k] + v if k in self.stats else v.clone()

    def flush(self, acc, names: list[str]) -> dict:
        """Mean loss overall and per source over the window (summed over processes), then reset."""
        n = len(names)
        stats = torch.cat([self.sums, self.counts])
        if acc.num_processes > 1:
            stats = acc.reduce(stats.to(acc.device), reduction="sum").cpu()
        sums, counts = stats[:n], stats[n:]
        entry = {"loss": float(sums.sum() / counts.sum().clamp(min=1))}
        entry |= {f"loss/{name}": float(sums[i] / counts[i]) for i, name in enumerate(names) if counts[i] > 0}
        entry["tokens_per_s"] = self.tokens / max(time.perf_counter() - self.t0, 1e-9)  # tokens are global
        if self.steps:
            entry["aux_loss"] = self.aux / self.steps
        for k, v in self.stats.items():  # per-source counts (e.g. expert routing), summed over processes
            if acc.num_processes > 1:
                v = acc.reduce(v.to(acc.device), reduction="sum").cpu()
            entry[k] = v.tolist()
        self.sums.zero_()
        self.counts.zero_()
        self.tokens, self.t0, self.aux, self.steps, self.stats = 0, time.perf_counter(), 0.0, 0, {}
        return entry


class TrainLog:
    """``log.jsonl``: one JSON object per log step (and ``{"note": ...}`` lines)."""

    def __init__(self, path: Path, *, enabled: bool, echo: bool = True) -> None:
        self.path, self.enabled, self.echo = path, enabled, echo
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, entry: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def note(self, text: str) -> None:
        self.write({"note": text})
        if self.enabled and self.echo:
            from rich.console import Console

            Console(stderr=True, soft_wrap=True).print(f"[dim]{text}[/]")  # one greppable line

    def truncate_after(self, global_step: int) -> None:
        """Drop entries logged after ``global_step`` (they are recomputed after resuming)."""
        if self.enabled and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if json.loads(line).get("step", 0) <= global_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))


class StageBar:
    """A Rich progress bar for one stage: steps, tokens/s, ETA, last logged loss."""

    def __init__(self, name: str, total: int, done: int, *, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[tps]} tok/s"), TextColumn("loss {task.fields[loss]}"),
                                 TimeRemainingColumn(), transient=False)
        self.task = self.progress.add_task(f"stage {name}", total=total, completed=done, tps="-", loss="-")
        self.progress.start()
        self.t0, self.tokens = time.perf_counter(), 0

    def advance(self, tokens: int) -> None:
        if self.enabled:
            self.tokens += tokens
            tps = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
            self.progress.update(self.task, advance=1, tps=f"{tps:,.0f}")

    def show_loss(self, loss: float) -> None:
        if self.enabled:
            self.progress.update(self.task, loss=f"{loss:.3f}")

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
