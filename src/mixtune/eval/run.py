"""Evaluate a model on abilities: held-out problems in, one score per ability out."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mixtune.core import CheckpointError, ConfigError, atomic_write_text
from mixtune.data.abilities import ABILITIES
from mixtune.data.format import prompt_text
from mixtune.models.generate import generate, max_tokens_for

if TYPE_CHECKING:
    from mixtune.models import LoadConfig


@dataclass(frozen=True)
class AbilityScore:
    """Accuracy of one model on one ability's held-out problems."""

    ability: str
    score: float
    n: int
    version: int
    higher_is_better: bool = True
    examples: list[dict] = field(default_factory=list, repr=False)
    """Per problem: prompt, output, gold answer, score."""


def evaluate(model, tokenizer, abilities: list[str], *, n: int = 200, seed: int = 0, difficulty: int = 1,
             batch_size: int = 64, progress=None, condition: str | None = None,
             tasks: Mapping[str, object] | None = None,
             transform: Callable[[str], str] | None = None) -> dict[str, AbilityScore]:
    """Score ``model`` on ``n`` held-out (test split) problems of each ability, greedy decoding.

    The problems depend only on (ability, n, seed, difficulty), so every model evaluated with the
    same arguments answers the same questions. Unknown abilities raise with close matches.
    ``condition``: C-RLFT's inference condition, the class tag the prompts carry. ``tasks``:
    abilities from the user's files (:mod:`mixtune.eval.tasks`) by name; each scores its first
    ``n`` records, with its own prompt format and budget. ``transform``: a rewording of each prompt
    (:mod:`mixtune.analysis.conjugate`), given a built-in problem's user message and a generate
    task's question; the problems and gold answers stay the same.

    Raises:
        ConfigError: ``n`` or ``batch_size`` is below 1, an ability is unknown, or ``transform`` is
            given with a code, multiple-choice or log-likelihood task.
    """
    if n < 1 or batch_size < 1:
        raise ConfigError(f"evaluation needs n >= 1 problems per ability and batch_size >= 1; got n = {n}, "
                          f"batch_size = {batch_size}")
    out = {}
    for name in abilities:
        if tasks and name in tasks:
            from mixtune.eval.tasks import run_task

            out[name] = run_task(name, tasks[name], model, tokenizer, n=n, batch_size=batch_size, progress=progress,
                                 transform=transform)
            continue
        records = ABILITIES.get(name).generate(n, seed=seed, split="test", difficulty=difficulty)
        out[name] = score_records(model, tokenizer, name, records, batch_size=batch_size, progress=progress,
                                  condition=condition, transform=transform)
    return out


def score_records(model, tokenizer, ability: str, records: list[dict], *, batch_size: int = 64, progress=None,
                  condition: str | None = None, transform: Callable[[str], str] | None = None) -> AbilityScore:
    """Score ``model`` on given problems of a built-in ability (e.g. a validation sample): greedy,
    prompted with the chat template (and ``condition``), budgeted by :func:`max_tokens_for`, each
    output scored by the ability. ``transform`` rewrites the text of every user turn before the chat
    template (the examples show the rewritten prompt); the gold replies, hence the budget, and the
    answers are left as they are."""
    impl = ABILITIES.get(ability)
    if transform is not None:
        records = [r | {"messages": [m | {"content": transform(m["content"])} if m["role"] == "user" else m
                                     for m in r["messages"]]} for r in records]
    prompts = [prompt_text(r["messages"], tokenizer, condition) for r in records]
    outputs = generate(model, tokenizer, prompts, batch_size=batch_size,
                       max_new_tokens=max_tokens_for(records, tokenizer), progress=progress)
    scores = [impl.score(o, r) for o, r in zip(outputs, records)]
    return AbilityScore(ability, sum(scores) / len(scores), len(scores), impl.version,
                        examples=[{"prompt": r["messages"][0]["content"], "output": o, "answer": r["answer"],
                                   "score": s} for r, o, s in zip(records, outputs, scores)])


def load_for_eval(path: str | os.PathLike, *, load: LoadConfig | None = None, allow_pickle: bool = False):
    """``(model, tokenizer)`` from a full model folder or an adapter folder.

    An adapter folder (a peft ``adapter_config.json``, or moe_lora's experts alone in
    ``moe_lora.json``) is applied to the base model its config names, which must be a local
    folder and may itself be an adapter folder (a study's stages chain this way). A relative base
    is looked up beside the adapter folder first, then from the working folder. ``load`` (a
    :class:`mixtune.models.LoadConfig`: dtype, attention, quantisation) applies to the model folder
    or the base; on a quantised base a peft adapter stays unmerged (a peft model), since merging
    would round it onto the quantised weights' grid.

    Raises:
        CheckpointError: as :func:`mixtune.models.load_model`; an adapter whose base is not a local
            folder; with ``load.quantization``, an adapter on an adapter or moe_lora experts (both
            need merging or plain linear layers).
    """
    from mixtune.models import load_model, load_tokenizer
    from mixtune.models.load import check_vocabulary
    from mixtune.models.quantize import is_quantized

    path = Path(path)
    experts = (path / "moe_lora.json").exists() and not (path / "config.json").exists()
    if not (path / "adapter_config.json").exists() and not experts:
        return load_model(path, load=load, allow_pickle=allow_pickle)
    from peft import PeftModel

    spec = path / ("moe_lora.json" if experts else "adapter_config.json")
    base_dir = Path(json.loads(spec.read_text()).get("base_model_name_or_path") or "")
    if not base_dir.is_absolute() and (path / base_dir).is_dir():  # a study's stages name their base relative
        base_dir = path / base_dir                                  # to themselves, so the study can move
    if not base_dir.is_dir():
        raise CheckpointError(f"{path}: an adapter whose base model {str(base_dir)!r} is not a local folder; "
                              f"set base_model_name_or_path in {spec.name} to the base model's folder")
    base, _ = load_for_eval(base_dir, load=load, allow_pickle=allow_pickle)
    quantized = is_quantized(base)
    if quantized is not None and (experts or hasattr(base, "peft_config")):
        what, why = (("moe_lora experts", "they need plain linear layers") if experts else
                     (f"an adapter on the adapter {base_dir}", "a chain is merged, which would round it onto the grid"))
        raise CheckpointError(f"{path}: {what} cannot go on a {quantized} quantised base ({why}); load it unquantised "
                              "(drop load.quantization)")
    tok_dir = path if (path / "tokenizer_config.json").exists() else base_dir
    tokenizer = load_tokenizer(tok_dir)
    if experts:
        from mixtune.models.moe_lora import load_into

        model = load_into(base, path)
    else:
        model = PeftModel.from_pretrained(base, path)
        model = model.merge_and_unload() if quantized is None else model
    check_vocabulary(model, tokenizer, f"{path} (adapter on base model {base_dir}, tokenizer from {tok_dir})")
    return model, tokenizer


def write_results(scores: dict[str, AbilityScore], out_dir: Path, meta: dict) -> None:
    """``scores.json`` (one entry per ability) and ``outputs.jsonl`` (every problem) in ``out_dir``."""
    summary = {"meta": meta, "scores": {a: {"score": s.score, "n": s.n, "version": s.version,
                                            "higher_is_better": s.higher_is_better} for a, s in scores.items()}}
    atomic_write_text(out_dir / "scores.json", json.dumps(summary, indent=2))
    atomic_write_text(out_dir / "outputs.jsonl", "".join(
        json.dumps({"ability": a} | e) + "\n" for a, s in scores.items() for e in s.examples))


def parse_abilities(text: str) -> tuple[list[str], dict]:
    """``--abilities``: built-in names and task files (``math,code,my-tasks.yaml``) -> the ability
    names in order and the file-defined tasks by name."""
    from mixtune.eval.tasks import tasks_in

    entries = [a.strip() for a in text.split(",") if a.strip()]
    if not entries:
        raise ConfigError("--abilities: give a comma-separated list, e.g. math,code,general or math,my-tasks.yaml")
    names, tasks = tasks_in(entries)
    for a in names:
        if a not in tasks:
            ABILITIES.get(a)
    return names, dict(tasks)


def ability_scorer(abilities: list[str], *, n: int = 100, seed: int = 1, difficulty: int = 1,
                   batch_size: int = 64, tasks: Mapping[str, object] | None = None) -> Callable[[Path], float]:
    """Mean accuracy over built-in ``abilities`` on ``n`` held-out problems each, greedy decoding.

    The problems are drawn from the abilities' test split with ``seed`` (default 1, where
    ``mixtune eval`` and studies default to 0): a different sample of the same held-out pool, so
    the two can share problems. For a clean final number, evaluate with a seed and ``n`` whose
    problems the soup did not see, or on data of your own.
    """
    def score(folder: Path) -> float:
        model, tok = load_for_eval(folder)
        scores = evaluate(model, tok, abilities, n=n, seed=seed, difficulty=difficulty, batch_size=batch_size,
                          tasks=tasks)
        return sum(s.score for s in scores.values()) / len(scores)

    return score


def during_training(cfg, tokenizer, base_dir: str | os.PathLike = ".") -> Callable[[object], dict[str, float]]:
    """The scorer of ``run.eval`` (a :class:`mixtune.train.config.TrainEval`): ``scores(model)``
    evaluates ``model`` on ``cfg.n`` problems of each ability (task files relative to ``base_dir``),
    greedy, and returns the score per ability. Every name is checked here, before training starts.

    Raises:
        ConfigError: an unknown ability, a missing task file, or a ``keep_best`` / ``weights`` name
            that is not one of the abilities.
    """
    entries = [a if not a.endswith((".yaml", ".yml")) else str(Path(base_dir) / a) for a in cfg.abilities]
    try:
        names, tasks = parse_abilities(",".join(entries))
    except ConfigError as e:  # say which key it is
        raise ConfigError(f"run.eval.abilities: {e}") from None
    for what, given in (("keep_best", [cfg.keep_best] if cfg.keep_best not in (None, "mean") else []),
                        ("weights", list(cfg.weights))):
        unknown = [a for a in given if a not in names]
        if unknown:
            raise ConfigError(f"run.eval.{what} names {', '.join(unknown)}, not an ability of run.eval.abilities "
                              f"({', '.join(names)})")

    def scores(model) -> dict[str, float]:
        got = evaluate(model, tokenizer, names, n=cfg.n, seed=cfg.seed, difficulty=cfg.difficulty,
                       batch_size=cfg.batch_size, tasks=tasks)
        return {a: s.score for a, s in got.items()}

    return scores
