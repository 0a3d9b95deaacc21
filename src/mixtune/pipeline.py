"""Runs the stages in order. Only this module and the CLI see every stage."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mixtune.builtin import builtin_tokenizer, init_builtin
from mixtune.core import ConfigError, DataError, dump_config
from mixtune.data.format import Example, Packed, pack, tokenize_records
from mixtune.data.mixture import Mixture, mix
from mixtune.data.sources import load_source_located
from mixtune.models import load_model, load_tokenizer
from mixtune.recipe import Recipe
from mixtune.strategy import StageConfig
from mixtune.strategy.mixing import Groups, grouped
from mixtune.train.loop import StageData, stage_steps, train


@dataclass(frozen=True)
class PreparedStage:
    """One stage's data: mixed, tokenized with label masks, packed."""

    config: StageConfig
    mixture: Mixture
    examples: list[Example]
    packed: Packed
    groups: Groups | None = None
    """With a grouped ``mixing`` mode: the training rows of each source and its held-out validation rows."""


@dataclass(frozen=True)
class PreparedData:
    stages: list[PreparedStage]
    source_names: list[str]
    """Every source of the recipe, in order; packed ``source_ids`` index this list."""
    tokenizer: object
    selected: dict[str, tuple[int, int]] = None  # type: ignore[assignment]
    """Sources with ``select``: (records before, records kept)."""


def tokenizer_for(model: str):
    """The tokenizer of a recipe's ``model``."""
    return builtin_tokenizer() if model.startswith("builtin:") else load_tokenizer(model)


def prepare_data(recipe: Recipe, base_dir: str | Path = ".", tokenizer=None, *, amount: float = 1.0,
                 amount_skip: set[str] = frozenset(), select_with: Path | None = None) -> PreparedData:  # type: ignore[assignment]
    """Load every source once; per stage, sample its mixture, tokenize, pack into rows.

    A record is tokenized at most once however many stages use it. ``amount`` < 1 keeps a seeded
    floor(amount x |D|) of every source not in ``amount_skip`` (data-scaling studies), before mixing.
    Sources with ``select`` are filtered first by the model in ``select_with`` (the starting model).
    """
    tokenizer = tokenizer or tokenizer_for(recipe.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    names = list(recipe.sources)
    loaded, origin = load_sources(recipe, base_dir)
    selected = select_sources(recipe, loaded, tokenizer, select_with)
    if amount != 1.0:
        from mixtune.data.mixture import MixtureConfig, Take

        keep = MixtureConfig(sources={n: None if n in amount_skip else Take(fraction=amount) for n in loaded})
        subset = mix(keep, loaded, seed=(recipe.seed, "amount"))
        loaded = {n: [loaded[n][i] for i in sorted(i for m, i in subset.picks if m == n)] for n in loaded}
    cache: dict[tuple[str, int], Example] = {}
    stages = []
    for s, stage in enumerate(recipe.resolved_stages()):
        try:
            mixture = mix(stage.mixture, loaded, seed=(recipe.seed, s))
        except ConfigError as e:
            raise ConfigError(f"stage {stage.name!r}: {e}") from None
        todo = sorted(set(mixture.picks) - cache.keys())
        cache.update(zip(todo, tokenize_records([loaded[n][i] for n, i in todo], tokenizer)))
        examples = [cache[p] for p in mixture.picks]
        where = [origin[id(loaded[n][i])] for n, i in mixture.picks]
        if not grouped(stage.mixing):
            packed = pack(examples, recipe.format.seq_len, pad_id=pad_id,
                          sources=[names.index(n) for n, _ in mixture.picks], long_examples=recipe.format.long_examples,
                          where=where)
            stages.append(PreparedStage(stage, mixture, examples, packed))
        else:
            packed, groups = pack_groups(mixture, examples, names, stage.mixing.validation, recipe, pad_id, where)
            stages.append(PreparedStage(stage, mixture, examples, packed, groups))
    return PreparedData(stages, names, tokenizer, selected)


def load_sources(recipe: Recipe, base_dir: str | Path) -> tuple[dict[str, list[dict]], dict[int, str]]:
    """Every source's records, and where each came from (``file:line`` ...) by the record's ``id``:
    subsetting and selection keep the record objects. The problems of all sources are reported
    together, in one error."""
    loaded, origin, problems = {}, {}, []
    for name, cfg in recipe.sources.items():
        try:
            loaded[name], where = load_source_located(name, cfg, seed=recipe.seed, base_dir=base_dir)
            origin.update((id(r), at) for r, at in zip(loaded[name], where))
        except DataError as e:
            problems.append(str(e))
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(f"{len(problems)} sources cannot be used:\n" + "\n".join(f"  {p}" for p in problems))
    return loaded, origin


def pack_groups(mixture: Mixture, examples: list[Example], names: list[str], n_val: int, recipe: Recipe,
                pad_id: int, where: list[str] | None = None) -> tuple[Packed, Groups]:
    """Each source of a mixed stage packed on its own (so a row belongs to one source), its first
    ``n_val`` mixed examples held out as validation rows; training rows concatenated, source by source.
    ``where`` names each example in errors (default: its source and 1-based record number)."""
    import torch

    order = [n for n in names if any(p[0] == n for p in mixture.picks)]
    where = where or [f"source {n!r} record {i + 1}" for n, i in mixture.picks]
    parts, rows, val, start, offset = [], [], [], 0, 0
    for name in order:
        mine = [i for i, (n, _) in enumerate(mixture.picks) if n == name]
        if len(mine) <= n_val:
            raise ConfigError(f"mixing: source {name!r} has {len(mine)} examples in this stage, not more than "
                              f"mixing.validation = {n_val} held out for validation")
        held, train_ = mine[:n_val], mine[n_val:]
        kw = dict(pad_id=pad_id, long_examples=recipe.format.long_examples)
        p = pack([examples[i] for i in train_], recipe.format.seq_len, sources=[names.index(name)] * len(train_),
                 where=[where[i] for i in train_], **kw)
        val.append(pack([examples[i] for i in held], recipe.format.seq_len, sources=[names.index(name)] * len(held),
                        where=[where[i] for i in held], **kw))
        n = p.input_ids.shape[0]
        parts.append(dataclasses.replace(p, example_ids=torch.where(p.example_ids >= 0, p.example_ids + offset, -1)))
        rows.append(torch.arange(start, start + n))
        start, offset = start + n, offset + len(train_)
    cat = {f: torch.cat([getattr(p, f) for p in parts]) for f in ("input_ids", "labels", "position_ids", "source_ids",
                                                                   "example_ids")}
    packed = Packed(**cat, dropped=sum(p.dropped for p in parts), truncated=sum(p.truncated for p in parts))
    return packed, Groups(order, rows, val)


def select_sources(recipe: Recipe, loaded: dict[str, list[dict]], tokenizer, model_dir: Path | None) -> dict:
    """Apply each source's ``select`` in place (scores cached per model under the user cache folder)."""
    import os

    from mixtune.data.select import model_fingerprint, select

    wanted = {n: c.select for n, c in recipe.sources.items() if c.select is not None}
    if not wanted:
        return {}
    if model_dir is None:
        raise ConfigError(f"sources {sorted(wanted)} select data with the starting model, which this command does not "
                          "load; run `mixtune train` or `mixtune study` (or `data preview` with a local model folder)")
    model, _ = load_model(model_dir)
    fingerprint = model_fingerprint(model_dir)
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mixtune" / "select"
    out = {}
    for name, cfg in wanted.items():
        keep = select(loaded[name], cfg, model, tokenizer, cache=cache_root / f"{fingerprint}.json",
                      fingerprint=fingerprint)
        out[name] = (len(loaded[name]), len(keep))
        loaded[name] = [loaded[name][i] for i in keep]
    return out


def stage_plan(recipe: Recipe, data: PreparedData) -> list[StageData]:
    """Each prepared stage with its resolved length, learning rate and schedule."""
    out = []
    for st in data.stages:
        c = st.config
        steps = stage_steps(st.packed.input_ids.shape[0], recipe.train, steps=c.steps, epochs=c.epochs)
        out.append(StageData(c.name, st.packed, steps, c.lr or recipe.train.lr, c.schedule or recipe.train.schedule,
                             c.mixing, st.groups))
    return out


def start_model(model: str, *, seed: int, folder: Path) -> Path:
    """The folder training starts from: ``model`` itself for a local folder; for ``builtin:SIZE``,
    ``folder``, where the built-in model is created (seeded) unless it is already there."""
    if not model.startswith("builtin:"):
        return Path(model)
    if not (folder / "config.json").exists():
        init_builtin(folder, size=model.removeprefix("builtin:"), seed=seed, overwrite=True)
    return folder


def run_training(recipe: Recipe, base_dir: Path, out_dir: Path, *, resume: bool = True, progress: bool = True,
                 accelerator=None, on_step=None) -> list[Path]:
    """Prepare the data, load the base model, train every stage; returns the stage model folders."""
    from mixtune.train.loop import make_accelerator

    acc = accelerator or make_accelerator(recipe.train.precision)
    # every data problem is found before anything is written (selection needs the model: it comes after)
    selecting = any(src.select is not None for src in recipe.sources.values())
    data = None if selecting else prepare_data(recipe, base_dir)
    if acc.is_main_process:
        start_model(recipe.model, seed=recipe.seed, folder=out_dir / "base")  # built once, before the others look
    acc.wait_for_everyone()
    start = start_model(recipe.model, seed=recipe.seed, folder=out_dir / "base")
    model, tokenizer = load_model(start)
    data = data or prepare_data(recipe, base_dir, tokenizer=tokenizer, select_with=start)
    evaluator = None
    if recipe.train.eval is not None:
        from mixtune.eval import during_training

        evaluator = during_training(recipe.train.eval, tokenizer, base_dir)
    return train(model, tokenizer, stage_plan(recipe, data), recipe.train, out_dir, source_names=data.source_names,
                 seed=recipe.seed, accelerator=acc, config_text=dump_config(recipe), resume=resume,
                 progress=progress, on_step=on_step, evaluator=evaluator)


class _Timed(Exception):
    """Raised from the loop's step callback once enough steps are timed (nothing is exported)."""


def estimate_seconds(recipe: Recipe, data: PreparedData, plans: list[StageData], *, steps: int = 4,
                     cpu_limit_bytes: int = 2 * 2**30) -> float | str:
    """Seconds the recipe's training steps will take here, on one process: the median of a few real
    optimizer steps of the first stage (after one warm-up step), through the one loop, times the steps
    of every stage. Validation passes of mixed stages, evaluations during training (``train.eval``)
    and exports are not counted. Returns a sentence
    instead when the model is too large to time on this CPU quickly.
    """
    import shutil
    import statistics
    import tempfile
    import time

    import torch

    if not recipe.model.startswith("builtin:") and not torch.cuda.is_available():
        size = sum(f.stat().st_size for f in Path(recipe.model).glob("*.safetensors"))
        if size > cpu_limit_bytes:
            return (f"not estimated ({size / 2**30:.1f} GiB of weights on a CPU); time it with "
                    f"`mixtune train RECIPE train.steps={steps}`")
    work = Path(tempfile.mkdtemp(prefix="mixtune-estimate-"))
    try:
        model, tokenizer = load_model(start_model(recipe.model, seed=recipe.seed, folder=work / "base"))
        stamps: list[float] = []

        def on_step(_step: int) -> None:
            stamps.append(time.perf_counter())
            if len(stamps) > steps:
                raise _Timed

        first = dataclasses.replace(plans[0], steps=steps + 2)
        try:
            train(model, tokenizer, [first], recipe.train.model_copy(update={"eval": None}), work / "run",
                  source_names=data.source_names,
                  seed=recipe.seed, resume=False, progress=False, on_step=on_step)
        except _Timed:
            pass
        per_step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return per_step * sum(p.steps for p in plans)
