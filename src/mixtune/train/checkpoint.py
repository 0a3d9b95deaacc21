"""What training writes to resume from, and where a run picks up again.

A finished stage is **exported** to ``OUT/stages/<name>/`` in the form the ecosystem loads: a
Hugging Face folder for methods that change the model's own weights, the adapter alone for
adapter methods (a peft adapter; the experts of ``moe_lora``), with the tokenizer and the
resolved recipe. The next stage starts with a fresh optimizer and schedule, so an export is all
a run needs to resume at a stage boundary.

A **checkpoint** (``OUT/checkpoints/step-N/``) is only for resuming inside a stage: the weights
that train in it (not the frozen base, which the method rebuilds and the previous export
restores), the optimizer, scheduler and RNG state (``accelerate``'s ``save_state``), a mixed
stage's mixer state (``mixer.json``) and ``trainer_state.json``. One is written every
``save_every`` steps and never otherwise; at most ``keep_checkpoints`` are on disk, and a
stage's are deleted once its export supersedes them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from mixtune.core import CheckpointError, atomic_dir, atomic_write_text

RESTART = "pass --fresh to train from the start"


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint as ``trainer_state.json``."""

    stage: int = 0
    step: int = 0  # optimizer steps done in ``stage``
    global_step: int = 0


def exported_stages(folders: list[Path]) -> int:
    """How many stages, from the first, have a complete export (it is renamed into place whole)."""
    n = 0
    while n < len(folders) and (folders[n] / "mixtune.yaml").exists():
        n += 1
    return n


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (one whose ``trainer_state.json`` was written)."""
    done = sorted((Path(out_dir) / "checkpoints").glob("step-*/trainer_state.json"))
    return done[-1].parent if done else None


def reap_partials(root: Path) -> None:
    """Checkpoints a killed run was writing: one that got its ``trainer_state.json`` (written last)
    is complete and is put in place; the others are deleted."""
    for partial in root.glob(".step-*.partial"):
        final = root / partial.name[1:].removesuffix(".partial")
        if (partial / "trainer_state.json").exists() and not final.exists():
            partial.rename(final)
        else:
            shutil.rmtree(partial, ignore_errors=True)


def prune(root: Path, keep: int, *, upto: int = -1) -> None:
    """Delete the checkpoints at or before global step ``upto`` (superseded by an export), then
    all but the newest ``keep``."""
    steps = sorted(root.glob("step-*"))
    superseded = [p for p in steps if int(p.name.removeprefix("step-")) <= upto]
    rest = [p for p in steps if p not in superseded]
    for p in superseded + rest[:max(len(rest) - keep, 0)]:
        shutil.rmtree(p, ignore_errors=True)


def trainable_only(models, weights: list[dict], output_dir) -> None:
    """accelerate save-state hook: keep only the parameters that train (a LoRA checkpoint holds the
    adapter, not the base); the rest comes back on resume from the method and the last export."""
    for model, state in zip(models, weights):
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        for k in [k for k in state if k not in keep]:
            del state[k]


def check_checkpoint(ckpt: Path, model) -> None:
    """``ckpt`` holds every parameter that trains in ``model`` (loading is not strict: it holds no others)."""
    from safetensors import safe_open

    saved: set[str] = set()
    files = sorted(ckpt.glob("model*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as h:
            saved |= set(h.keys())
    lacking = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in saved)
    if files and lacking:
        raise CheckpointError(f"{ckpt}: has no weights for {len(lacking)} parameter(s) that train here "
                              f"({lacking[:3]}); it was written by another method or recipe. Delete it, or " + RESTART)


def save_checkpoint(acc, out_dir: Path, at: Progress, keep: int, config_text: str, mixer: dict | None = None) -> Path:
    """A resumable checkpoint: accelerate state (trained weights, optimizer, scheduler, RNG) written
    to a hidden partial folder with ``trainer_state.json`` last, renamed into place once complete;
    the oldest are deleted first so that at most ``keep`` are ever on disk."""
    root = Path(out_dir) / "checkpoints"
    name = f"step-{at.global_step:07d}"
    final, partial = root / name, root / f".{name}.partial"
    if acc.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
    acc.wait_for_everyone()
    hook = acc.register_save_state_pre_hook(trainable_only)
    try:
        acc.save_state(str(partial))
    finally:
        hook.remove()
    acc.wait_for_everyone()
    if acc.is_main_process:
        atomic_write_text(partial / "mixtune.yaml", config_text)
        if mixer is not None:  # a mixed stage's proportions and data positions
            atomic_write_text(partial / "mixer.json", json.dumps(mixer))
        atomic_write_text(partial / "trainer_state.json", json.dumps(at.__dict__))
        prune(root, keep - 1)
        partial.rename(final)
    acc.wait_for_everyone()
    return final


def drop_checkpoints(acc, out_dir: Path, upto: int, keep: int) -> None:
    """Delete checkpoints an export supersedes (global step <= ``upto``), and any beyond ``keep``."""
    root = Path(out_dir) / "checkpoints"
    if acc.is_main_process and root.is_dir():
        prune(root, keep, upto=upto)
        if not any(root.iterdir()):
            root.rmdir()
    acc.wait_for_everyone()


def export_stage(acc, model, tokenizer, tuner, params, dest: Path, config_text: str,
                 extra: dict[str, str] | None = None) -> Path:
    """Write the stage model atomically (main process), with tokenizer and resolved config, and the
    ``extra`` files (name -> text) inside before it is renamed into place."""
    from mixtune.train.sharding import full_state_dict

    state_dict = full_state_dict(acc, model)  # gathered whole on the main process, whatever shards the model
    acc.wait_for_everyone()
    if acc.is_main_process:
        with atomic_dir(dest, overwrite=True) as tmp:
            tuner.export(acc.unwrap_model(model), params, tmp, state_dict)
            tokenizer.save_pretrained(tmp)
            if (tmp / "merged").is_dir():  # an adapter's merged model is a full model folder too
                tokenizer.save_pretrained(tmp / "merged")
            atomic_write_text(tmp / "mixtune.yaml", config_text)
            for name, text in (extra or {}).items():
                atomic_write_text(tmp / name, text)
    acc.wait_for_everyone()
    return dest


def resume_point(acc, out_dir: Path, names: list[str], steps: list[int], keep: int, log,
                 texts: list[str], known: int = 0) -> tuple[Progress, Path | None]:
    """Where a run of stages ``names`` (of ``steps`` steps each) picks up: after the last of them
    exported in ``out_dir`` (they are a prefix), or inside the next one from its newest checkpoint
    if there is one. Checkpoints the exports supersede, and any beyond ``keep``, are deleted, and
    the log loses what it holds after that point (it is logged again). ``texts``: each stage's recipe
    text, compared with the one its export was trained from. ``known``: how many leading stages the
    caller knows are exported (a graph node's earlier stages): resuming after them is not announced."""
    folders = [Path(out_dir) / "stages" / n for n in names]
    done = exported_stages(folders)
    at = Progress(stage=done, global_step=sum(steps[:done]))
    if acc.is_main_process and (Path(out_dir) / "checkpoints").is_dir():
        reap_partials(Path(out_dir) / "checkpoints")
    acc.wait_for_everyone()
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None:
        state = Progress(**json.loads((ckpt / "trainer_state.json").read_text()))
        if state.stage > done:
            raise CheckpointError(f"{ckpt} continues {folders[state.stage - 1]}, which is missing; put it back, or "
                                  + RESTART)
        ckpt, at = (ckpt, state) if state.stage == done else (None, at)  # older: the export supersedes it
    drop_checkpoints(acc, out_dir, -1 if ckpt is not None else at.global_step, keep)
    log.truncate_after(at.global_step)
    if ckpt is not None:
        log.note(f"resuming from {ckpt} (stage {at.stage}, step {at.step})")
    elif done > known:
        note_resumed(log, folders, steps, done)
    for f, text in zip(folders[:done], texts):
        if (f / "mixtune.yaml").read_text() != text:
            log.note(f"{f} was trained from a recipe that differs from this one (see its mixtune.yaml); "
                     + RESTART + " again")
    return at, ckpt


def note_resumed(log, folders: list[Path], steps: list[int], done: int) -> None:
    """Log that a run picks up after its first ``done`` exported stages (``folders``, of ``steps`` steps)."""
    log.note(f"resuming from {folders[done - 1]} (stage {done - 1}, step {steps[done - 1]})"
             + (": every stage is trained" if done == len(folders) else ""))


def start_over(acc, out_dir: Path, names: list[str], log) -> None:
    """A fresh run: delete the exports of stages ``names``, the checkpoints, the best weights
    (``run.eval.keep_best``) and the log a previous run left in ``out_dir``, so that neither a later
    resume nor this run's evaluations take them for this run's."""
    old = [p for p in [Path(out_dir) / "checkpoints", Path(out_dir) / "best",
                       *(Path(out_dir) / "stages" / n for n in names)] if p.exists()]
    if acc.is_main_process:
        log.path.unlink(missing_ok=True)  # its steps and evaluations are the replaced run's
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        if old:
            log.note(f"starting over: deleted {', '.join(str(p) for p in old)}")
    acc.wait_for_everyone()
