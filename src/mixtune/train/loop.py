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

**Data order** is a function of (seed, stage, step) only: a stage's rows are walked through one
seeded permutation per epoch, and the RNG is reseeded at every stage start; every stream is a
named one (:mod:`mixtune.core.seeds`), indexed by the stage's position in the whole run. A run resumes after
its last exported stage, or from a newer checkpoint inside the next one; there the step counter
says where the data is, and trained weights, optimizer, scheduler and RNG state come back through
``accelerator.load_state`` (:mod:`mixtune.train.checkpoint`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mixtune.core import ConfigError, atomic_write_text
from mixtune.core.seeds import rng, seed_int, torch_generator
from mixtune.data.format import Packed
from mixtune.strategy import Schedule
from mixtune.strategy.online import MixingConfig, OnlineMixer, batch_counts
from mixtune.train.checkpoint import (Progress, check_checkpoint, drop_checkpoints, export_stage, resume_point,
                                      save_checkpoint, start_over)
from mixtune.train.config import TrainConfig
from mixtune.train.evaluation import DuringTraining, Scorer
from mixtune.train.losses import mask_thought, masked_thought_rate, per_source, token_losses, token_weights
from mixtune.train.methods import TUNERS
from mixtune.train.methods.base import load_full


@dataclass(frozen=True)
class Groups:
    """A mixed stage's sources: the rows of each (in ``StageData.packed``) and its validation rows."""

    names: list[str]
    rows: list[torch.Tensor]
    val: list[Packed]


@dataclass(frozen=True)
class StageData:
    """One stage, ready to train: its packed rows and resolved length and schedule."""

    name: str
    packed: Packed
    steps: int
    lr: float
    schedule: Schedule
    mixing: MixingConfig | None = None
    groups: Groups | None = None


def stage_steps(n_rows: int, cfg: TrainConfig, *, steps: int | None, epochs: float | None) -> int:
    """Optimizer steps of a stage: explicit steps, else ceil(epochs x rows / batch_size)."""
    if steps or cfg.steps:
        return steps or cfg.steps  # type: ignore[return-value]
    return max(1, math.ceil((epochs or cfg.epochs) * n_rows / cfg.batch_size))


class BatchOrder:
    """Global batches of row indices: epoch e walks the rows in permutation(seed, stage, e)."""

    def __init__(self, n_rows: int, batch_size: int, seed: int, stage: int) -> None:
        self.n_rows, self.batch_size, self.seed, self.stage = n_rows, batch_size, seed, stage
        self._perms: dict[int, np.ndarray] = {}

    def rows(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, i = divmod(pos, self.n_rows)
            if epoch not in self._perms:
                self._perms = {epoch: rng(self.seed, "batch-order", self.stage, epoch).permutation(self.n_rows)}
            out.append(int(self._perms[epoch][i]))
        return out


class MixedBatches:
    """Global batches of a mixed stage: each step's proportions (from its :class:`OnlineMixer`)
    become row counts per source, and each source's rows are walked through one seeded
    permutation per pass over them."""

    def __init__(self, stage: StageData, batch_size: int, seed: int, index: int) -> None:
        self.groups, self.batch_size, self.seed, self.index = stage.groups, batch_size, seed, index
        self.mixer = OnlineMixer(stage.mixing, stage.groups.names, seed, index,
                                 natural=[len(r) for r in stage.groups.rows])
        self.used = [0] * len(stage.groups.names)
        self.carry = np.zeros(len(stage.groups.names))

    def rows(self, step: int) -> list[int]:
        out = []
        counts, self.carry = batch_counts(self.mixer.mixture(step), self.batch_size, self.carry)
        for g, count in enumerate(counts):
            pool = self.groups.rows[g]
            for _ in range(int(count)):
                epoch, i = divmod(self.used[g], len(pool))
                perm = rng(self.seed, "mixed-batches", self.index, self.groups.names[g], epoch).permutation(len(pool))
                out.append(int(pool[perm[i]]))
                self.used[g] += 1
        return out

    def state_dict(self) -> dict:
        return {"used": self.used, "carry": self.carry.tolist(), "mixer": self.mixer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.used, self.carry = state["used"], np.array(state["carry"])
        self.mixer.load_state_dict(state["mixer"])


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
        rows = {k: getattr(packed, k) for k in ("input_ids", "labels", "position_ids", "source_ids")}
        sums, counts = batch_losses(model, rows, 16, int(packed.source_ids.max()) + 1, acc)
        out.append(float(sums.sum() / counts.sum().clamp(min=1)))
    model.train()
    return np.array(out)


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

    # Schedules count global optimizer steps. By default accelerate steps a prepared scheduler once
    # per process per optimizer step (it assumes per-process lengths), which would make the learning
    # rate decay N times too fast on N processes.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=resolve_precision(precision),
                       step_scheduler_with_optimizer=False)


def train(model, tokenizer, stages: list[StageData], cfg: TrainConfig, out_dir: Path, *, source_names: list[str],
          seed: int = 0, accelerator=None, config_text: str = "", resume: bool = True, progress: bool = True,
          on_step: Callable[[int], None] | None = None, first_stage: int = 0,
          evaluator: Scorer | None = None) -> list[Path]:
    """Train ``model`` through ``stages``; returns the folders of the exported stage models.

    Args:
        model: a causal LM (a Hugging Face model).
        tokenizer: saved beside every exported model.
        stages: stages in order.
        cfg: the training section of the recipe.
        out_dir: ``log.jsonl``, ``stages/<name>/`` (exported models) and ``checkpoints/`` (with ``save_every``).
        source_names: names of the source ids in the packed rows, for per-source loss.
        seed: seeds data order, dropout and method randomness.
        accelerator: an ``accelerate.Accelerator`` (default: :func:`make_accelerator`).
        config_text: the resolved recipe, written beside every checkpoint and export.
        resume: continue after the last stage exported in ``out_dir``, or from a newer checkpoint;
            otherwise the stages and checkpoints there are deleted first.
        progress: show a progress bar (on the main process).
        on_step: called with the global step after every optimizer step.
        first_stage: the position of ``stages[0]`` in the whole run, when a run is trained one
            stage per call (a study): every per-stage random stream (data order, online mixing,
            Masked Thought, methods that re-select per stage such as HFT, the stage's seed) is
            indexed by the stage's position in the whole run, so a stage trains the same either way.
        evaluator: with ``cfg.eval``, scores a model per ability (:mod:`mixtune.train.evaluation`;
            ``mixtune.eval.during_training`` builds it).
    """
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    acc = accelerator or make_accelerator(cfg.precision)
    set_seed(seed)
    out_dir = Path(out_dir)
    tuner, params = TUNERS.get(cfg.method.name), cfg.method
    world = acc.num_processes
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise ConfigError(f"train.batch_size = {cfg.batch_size} must be a multiple of micro_batch_size x processes "
                          f"= {cfg.micro_batch_size} x {world}")
    accum = cfg.batch_size // (cfg.micro_batch_size * world)

    # 1) the method decides what trains
    model = tuner.prepare(model, params, seed)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log = TrainLog(out_dir / "log.jsonl", enabled=acc.is_main_process, echo=progress)

    by_source = {}
    for field in ("task_weights", "rewards"):
        unknown = set(getattr(cfg, field)) - set(source_names)
        if unknown:
            raise ConfigError(f"train.{field} names {sorted(unknown)}, not sources ({', '.join(source_names)})")
        given = getattr(cfg, field)
        by_source[field] = torch.tensor([given.get(n, 1.0) for n in source_names]) if given else None
    mask_id = None
    if cfg.masked_thought is not None and cfg.masked_thought.mask_token is not None:
        mask_id = tokenizer.convert_tokens_to_ids(cfg.masked_thought.mask_token)
        if mask_id is None or mask_id == tokenizer.unk_token_id:
            raise ConfigError(f"train.masked_thought.mask_token {cfg.masked_thought.mask_token!r} is not in the "
                              "tokenizer's vocabulary")

    # 2) resume where a previous run stopped: after its last exported stage, or from a newer checkpoint
    names, lengths = [st.name for st in stages], [st.steps for st in stages]
    if resume:
        at, ckpt = resume_point(acc, out_dir, names, lengths, cfg.keep_checkpoints, log, config_text)
    else:
        start_over(acc, out_dir, names, log)
        at, ckpt = Progress(), None
    if 0 < at.stage < len(stages):  # the last export holds what trained so far (a checkpoint adds the stage's part)
        (tuner.load_export or load_full)(model, params, out_dir / "stages" / stages[at.stage - 1].name)

    if cfg.eval is not None and evaluator is None:
        raise ConfigError("train.eval is set but nothing scores the model: pass an evaluator "
                          "(mixtune.eval.during_training builds one)")
    evals = (DuringTraining(cfg.eval, evaluator, acc=acc, log=log, tokenizer=tokenizer, out_dir=out_dir)
             if cfg.eval is not None else None)

    exported = []
    for s, stage in enumerate(stages):
        if s < at.stage:
            exported.append(out_dir / "stages" / stage.name)
            continue
        # 3) what trains in this stage (a method may re-select it), a fresh optimizer and schedule
        bare = acc.unwrap_model(model)
        if tuner.start_stage is not None:
            tuner.start_stage(bare, params, seed, first_stage + s)
        trainable = [p for p in bare.parameters() if p.requires_grad]
        if tuner.optimizer is not None:
            optimizer = tuner.optimizer(bare, params, stage.lr, cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=cfg.weight_decay)
        n_all = sum(p.numel() for p in bare.parameters())
        n_train = (optimizer.trainable_entries() if hasattr(optimizer, "trainable_entries")  # sparse: entries, not tensors
                   else sum(p.numel() for p in trainable))
        state = optimizer.state_bytes() if hasattr(optimizer, "state_bytes") else 8 * n_train  # AdamW: 2 fp32 moments
        log.note(f"stage {stage.name}: method {params.name}, {n_train:,} of {n_all:,} parameters train "
                 f"({n_train / n_all:.2%}); optimizer state {state / 2**20:.2f} MiB; precision {acc.mixed_precision}; "
                 f"{world} process(es), accumulation {accum}")
        log.write({"stage": stage.name, "trainable_params": n_train, "total_params": n_all, "optimizer_bytes": state})
        scheduler = get_scheduler("constant_with_warmup" if stage.schedule == "constant" else stage.schedule,
                                  optimizer, num_warmup_steps=round(cfg.warmup * stage.steps),
                                  num_training_steps=stage.steps)
        acc.free_memory()  # forget the previous stage's optimizer so save_state holds this one
        model, optimizer, scheduler = acc.prepare(bare, optimizer, scheduler)
        set_seed(seed_int(seed, "stage", first_stage + s))  # so a stage resumed from an export runs as it did
        start = 0
        if ckpt is not None and s == at.stage:
            check_checkpoint(ckpt, model)
            acc.load_state(str(ckpt), strict=False)  # it holds only the weights that train (and the RNG state)
            start = at.step
        reference = None
        if stage.mixing is None:
            order = BatchOrder(stage.packed.input_ids.shape[0], cfg.batch_size, seed, first_stage + s)
        else:
            order = MixedBatches(stage, cfg.batch_size, seed, first_stage + s)
            if ckpt is not None and s == at.stage and (ckpt / "mixer.json").exists():
                order.load_state_dict(json.loads((ckpt / "mixer.json").read_text()))
            group_ids = torch.tensor([source_names.index(g) for g in stage.groups.names])
            if stage.mixing.name == "doremi":  # the fixed reference model DoReMi measures excess loss against
                from mixtune.models import load_model

                reference = load_model(stage.mixing.reference)[0].to(acc.device).eval()
        model.train()
        window = Window(len(source_names))
        bar = StageBar(stage.name, stage.steps, start, enabled=progress and acc.is_main_process)

        def export_best(dest: Path, best: dict) -> None:
            export_stage(acc, model, tokenizer, tuner, params, dest, config_text,
                         extra={"best.json": json.dumps(best, indent=2)})

        # the starting model (global step 0) or a stage boundary `every` hits; a run trained one stage per
        # call (a study) evaluated this stage's start at the end of the previous one
        if evals is not None and start == 0 and not (first_stage > 0 and at.global_step == 0):
            evals.maybe(model, global_step=at.global_step, stage=stage.name, stage_step=0, stage_end=False,
                        export=export_best)
        for step in range(start, stage.steps):
            # 4) one optimizer step over the global batch (a mixed stage may first want validation losses)
            if stage.mixing is not None and order.mixer.wants_eval(step, after=False):
                order.mixer.observe(step, validation_losses(model, stage.groups.val, acc), after=False)
            rows = order.rows(step)
            batch = {k: getattr(stage.packed, k)[rows] for k in ("input_ids", "labels", "position_ids", "source_ids")}
            loss_mode, task_w = cfg.loss, by_source["task_weights"]
            alpha = order.mixer.loss_weights() if stage.mixing is not None else None
            if alpha is not None:  # DoReMi / CoBa: sum_i w_i x (group i's mean token loss)
                loss_mode, task_w = "case3", torch.zeros(len(source_names), dtype=torch.float64)
                task_w[group_ids] = torch.from_numpy(alpha)
            weights = token_weights(batch["labels"], batch["source_ids"], stage.packed.example_ids[rows], loss_mode,
                                    task_w, by_source["rewards"]).float()
            step_sums = torch.zeros(len(source_names), dtype=torch.float64)
            step_counts = torch.zeros(len(source_names), dtype=torch.float64)
            if cfg.masked_thought is not None:
                mt = cfg.masked_thought
                rate = masked_thought_rate(step, stage.steps, mt.rate, mt.warmup)
                gen = torch_generator(seed, "masked-thought", first_stage + s, step)
                batch["input_ids"] = mask_thought(batch["input_ids"], batch["labels"], rate, gen,
                                                  vocab_size=acc.unwrap_model(model).config.vocab_size, mask_id=mask_id)
            for g in range(accum):
                first = (g * world + acc.process_index) * cfg.micro_batch_size
                mb = {k: v[first:first + cfg.micro_batch_size].to(acc.device) for k, v in batch.items()}
                mb_weights = weights[first:first + cfg.micro_batch_size].to(acc.device)
                sync = g == accum - 1
                if tuner.before_forward is not None:
                    tuner.before_forward(acc.unwrap_model(model), mb)
                with nullcontext() if sync else acc.no_sync(model):
                    logits = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits
                    ce = token_losses(logits, mb["labels"])  # (m, L-1)
                    loss = (ce * mb_weights).sum() * world  # the global batch's loss, in this micro-batch's share
                    if tuner.aux_loss is not None:  # e.g. a router's load balance, averaged over micro-batches
                        aux = tuner.aux_loss(acc.unwrap_model(model))
                        if aux is not None:
                            loss = loss + aux / accum
                            window.aux += float(aux.detach()) / accum
                    acc.backward(loss)
                sums, counts = per_source(ce.detach().cpu(), mb["labels"].cpu(), mb["source_ids"].cpu(),
                                          len(source_names))
                window.add(sums, counts)
                step_sums += sums
                step_counts += counts
                if tuner.batch_stats is not None:
                    window.add_stats(tuner.batch_stats(acc.unwrap_model(model), mb["source_ids"].cpu(),
                                                       len(source_names)))
            grad_norm = acc.clip_grad_norm_(trainable, cfg.max_grad_norm) if cfg.max_grad_norm else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            at = Progress(stage=s, step=step + 1, global_step=at.global_step + 1)
            if reference is not None:
                if world > 1:  # this process saw only its micro-batches
                    step_sums = acc.reduce(step_sums.to(acc.device), reduction="sum").cpu()
                    step_counts = acc.reduce(step_counts.to(acc.device), reduction="sum").cpu()
                ref_sums, ref_counts = batch_losses(reference, batch, cfg.micro_batch_size, len(source_names), acc)
                order.mixer.observe_excess(step, (step_sums / step_counts)[group_ids].numpy(),
                                           (ref_sums / ref_counts)[group_ids].numpy())
            if stage.mixing is not None and order.mixer.wants_eval(step, after=True):
                order.mixer.observe(step, validation_losses(model, stage.groups.val, acc), after=True)
            tokens = int((stage.packed.example_ids[rows] >= 0).sum())  # real tokens in the global batch
            bar.advance(tokens)
            window.tokens += tokens
            window.steps += tuner.aux_loss is not None

            # 5) log, checkpoint
            if at.step % cfg.log_every == 0 or at.step == stage.steps:
                entry = window.flush(acc, source_names)
                entry |= {"step": at.global_step, "stage": stage.name, "stage_step": at.step,
                          "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else None}
                if stage.mixing is not None:  # the proportions in use, and at the end each source's validation loss
                    shares = order.mixer.loss_weights()
                    shares = order.mixer.mixture(step) if shares is None else shares  # DoReMi: the loss weights
                    entry |= {f"mix/{g}": float(v) for g, v in zip(stage.groups.names, shares)}
                    if at.step == stage.steps:
                        val = validation_losses(model, stage.groups.val, acc)
                        entry |= {f"val_loss/{g}": float(v) for g, v in zip(stage.groups.names, val)}
                log.write(entry)
                bar.show_loss(entry["loss"])
            if evals is not None:
                evals.maybe(model, global_step=at.global_step, stage=stage.name, stage_step=at.step,
                            stage_end=at.step == stage.steps, export=export_best)
            if cfg.save_every and at.global_step % cfg.save_every == 0 and at.step < stage.steps:
                save_checkpoint(acc, out_dir, at, cfg.keep_checkpoints, config_text,
                                mixer=order.state_dict() if stage.mixing is not None else None)
            if on_step is not None:
                on_step(at.global_step)
        bar.close()
        # 6) the stage's model, in the form the ecosystem loads; it supersedes the stage's checkpoints
        if stage.mixing is not None and order.mixer.history:
            log.write({"stage": stage.name, "mixing_rounds": order.mixer.history, "groups": stage.groups.names})
        if reference is not None:  # DoReMi's answer: the time-averaged weights, for a static run
            log.write({"stage": stage.name, "doremi_average": order.mixer.average_alpha().tolist(),
                       "groups": stage.groups.names})
        exported.append(export_stage(acc, model, tokenizer, tuner, params, out_dir / "stages" / stage.name, config_text))
        drop_checkpoints(acc, out_dir, at.global_step, cfg.keep_checkpoints)
    return exported


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
