"""Evaluation during training (``run.eval``): when to score the current weights, what is logged,
and the best weights kept.

The loop calls :meth:`DuringTraining.maybe` after every optimizer step (and once before the first).
The scoring itself is a function handed in by the caller (``mixtune.eval`` builds it: a training
stage does not import the evaluation stage), run on the main process only, under
:func:`preserved_state`: the random streams, the model's training mode and the tokenizer's padding
side are put back afterwards, so a run with evaluations trains exactly the weights of a run without.

Log entries: ``{"step", "stage", "stage_step", "eval/<ability>": score, ..., "eval_seconds"}`` in
``log.jsonl``. With ``keep_best``, the weights that score best so far (an ability, or the weighted
mean of all) are exported to ``OUT/best/`` in the stage export's form, with ``best.json`` (step,
stage, the scores and the value) written inside before the folder is renamed into place; ties keep
the earlier weights. After a resume, the best value is read back from the log, which holds every
evaluation up to the resume point.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from mixtune.train.config import TrainEval

Scorer = Callable[[object], dict[str, float]]
"""``scores(model) -> {ability: score}``: the model is the bare (unwrapped) model being trained."""


@contextmanager
def preserved_state(model, tokenizer) -> Iterator[None]:
    """Put back everything an evaluation could change that training depends on: the torch (CPU and
    CUDA), numpy and ``random`` streams, the model's training mode and the tokenizer's padding side."""
    cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    np_state, py_state = np.random.get_state(), random.getstate()
    was_training, side = model.training, getattr(tokenizer, "padding_side", None)
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)
        model.train(was_training)
        if side is not None:
            tokenizer.padding_side = side


def best_value(cfg: TrainEval, scores: dict[str, float]) -> float:
    """The number ``keep_best`` ranks weights by: one ability's score, or the mean over the
    abilities weighted by ``weights`` (1 each unless given)."""
    if cfg.keep_best != "mean":
        return scores[cfg.keep_best]
    w = {a: cfg.weights.get(a, 1.0) for a in scores}
    return sum(w[a] * s for a, s in scores.items()) / sum(w.values())


def is_due(cfg: TrainEval, global_step: int, *, stage_end: bool) -> bool:
    """Whether a run evaluates at ``global_step``: the start, every ``every`` steps, every stage's end."""
    return global_step == 0 or global_step % cfg.every == 0 or stage_end


def evaluation_steps(cfg: TrainEval, stage_steps: list[int]) -> list[int]:
    """The global steps a run of stages of ``stage_steps`` steps each evaluates at (:func:`is_due`)."""
    ends = {sum(stage_steps[:i + 1]) for i in range(len(stage_steps))}
    return [g for g in range(sum(stage_steps) + 1) if is_due(cfg, g, stage_end=g in ends)]


class DuringTraining:
    """The evaluations of one training run."""

    def __init__(self, cfg: TrainEval, scores: Scorer, *, acc, log, tokenizer, out_dir: Path) -> None:
        self.cfg, self.scores, self.acc, self.log, self.tokenizer = cfg, scores, acc, log, tokenizer
        self.best_dir = Path(out_dir) / "best"
        self.best: float | None = None
        self.done: set[int] = set()
        if log.path.exists():  # a resumed run: what was evaluated before the resume point
            for line in log.path.read_text().splitlines():
                entry = json.loads(line)
                if any(k.startswith("eval/") for k in entry):
                    self.done.add(entry["step"])
                    if cfg.keep_best is not None:
                        value = best_value(cfg, {k.removeprefix("eval/"): v for k, v in entry.items()
                                                 if k.startswith("eval/")})
                        self.best = value if self.best is None else max(self.best, value)

    def maybe(self, model, *, global_step: int, stage: str, stage_step: int, stage_end: bool,
              export: Callable[[Path, dict], None]) -> None:
        """Evaluate at global step 0, every ``every`` steps and at the end of every stage (once per
        step); ``export(dest, best)`` writes the model to ``dest`` with ``best`` as ``best.json``."""
        if not is_due(self.cfg, global_step, stage_end=stage_end) or global_step in self.done:
            return
        self.done.add(global_step)
        acc = self.acc
        payload = [None]
        if acc.is_main_process:
            bare = acc.unwrap_model(model)
            t0 = time.perf_counter()
            with preserved_state(bare, self.tokenizer):
                scores = self.scores(bare)
            seconds = time.perf_counter() - t0
            self.log.write({"step": global_step, "stage": stage, "stage_step": stage_step}
                           | {f"eval/{a}": float(v) for a, v in scores.items()} | {"eval_seconds": seconds})
            self.log.note(f"eval at step {global_step} (stage {stage}, step {stage_step}): "
                          + ", ".join(f"{a} {v:.3f}" for a, v in scores.items()) + f" ({seconds:.1f} s)")
            payload = [scores]
        if acc.num_processes > 1:  # every process takes part in an export
            from accelerate.utils import broadcast_object_list

            payload = broadcast_object_list(payload)
        if self.cfg.keep_best is None:
            return
        (scores,) = payload
        value = best_value(self.cfg, scores)
        if self.best is None or value > self.best:
            self.best = value
            export(self.best_dir, {"step": global_step, "stage": stage, "stage_step": stage_step,
                                   "keep_best": self.cfg.keep_best, "value": value, "scores": scores})
            self.log.note(f"best so far by {self.cfg.keep_best} ({value:.3f}): weights of step {global_step} "
                          f"in {self.best_dir}")
