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
from mixtune.models import LoadConfig, load_model, load_tokenizer
from mixtune.models.load import pad_id_of
from mixtune.recipe import Recipe
from mixtune.strategy import StageConfig
from mixtune.strategy.mixing import Groups, grouped
from mixtune.graph import Node
from mixtune.train.config import RunOptions, TrainConfig
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
    records: tuple[dict, ...] = ()
    """An objective stage's records (prompts, pairs), in mixture order."""


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
    A stage that uses a streamed source (``stream: true``) keeps its picks as arrays, its examples in
    token caches and its rows in files (:mod:`mixtune.data.packed_files`): the same rows, in bounded memory.
    """
    import numpy as np

    from mixtune.data.mixture import PickNames
    from mixtune.data.packed_files import Part, pack_to_disk
    from mixtune.data.stream import StreamedSource
    from mixtune.data.tokens import stage_examples

    tokenizer = tokenizer or tokenizer_for(recipe.model)
    pad_id = pad_id_of(tokenizer)
    if pad_id is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    names = list(recipe.sources)
    loaded, origin = load_sources(recipe, base_dir)
    selected = select_sources(recipe, loaded, tokenizer, select_with)
    if amount != 1.0:
        from mixtune.data.mixture import MixtureConfig, Take, draw

        keep = MixtureConfig(sources={n: None if n in amount_skip else Take(fraction=amount) for n in loaded})
        subset, _ = draw(keep, {n: len(r) for n, r in loaded.items()}, seed=(recipe.seed, "amount"))
        kept = {n: np.sort(subset.index[subset.source == k]) for k, n in enumerate(subset.names)}
        loaded = {n: r.subset(kept[n]) if isinstance(r, StreamedSource) else [r[i] for i in kept[n].tolist()]
                  for n, r in loaded.items()}

    def where_of(n: str, i: int) -> str:
        return loaded[n].where(i) if isinstance(loaded[n], StreamedSource) else origin[id(loaded[n][i])]

    cache: dict[tuple[str, int], Example] = {}
    stages = []
    for s, stage in enumerate(recipe.resolved_stages()):
        streamed = any(isinstance(loaded[n], StreamedSource) for n in stage.mixture.sources)
        if streamed and stage.objective is not None:
            raise ConfigError(f"stage {stage.name!r}: objective {stage.objective.name} samples its prompts' replies "
                              "in memory; its sources cannot be streamed (drop stream: true)")
        try:
            mixture = mix(stage.mixture, loaded, seed=(recipe.seed, s), lazy=streamed)
        except ConfigError as e:
            raise ConfigError(f"stage {stage.name!r}: {e}") from None
        if streamed:  # picks as arrays, examples in token stores, names of records computed for errors only
            examples = stage_examples(mixture.picks, loaded, tokenizer, cache)
            where = PickNames(mixture.picks, where_of)
        else:
            todo = sorted(set(mixture.picks) - cache.keys())
            cache.update(zip(todo, tokenize_records([loaded[n][i] for n, i in todo], tokenizer)))
            examples = [cache[p] for p in mixture.picks]
            where = [origin[id(loaded[n][i])] for n, i in mixture.picks]
        if not grouped(stage.mixing) and streamed:
            ids = np.array([names.index(n) for n in mixture.picks.names], dtype=np.int64)[mixture.picks.source]
            packed, _ = pack_to_disk([Part(examples, ids, where)], recipe.format.seq_len, pad_id=pad_id,
                                     long_examples=recipe.format.long_examples)
            stages.append(PreparedStage(stage, mixture, examples, packed))
        elif not grouped(stage.mixing):
            packed = pack(examples, recipe.format.seq_len, pad_id=pad_id,
                          sources=[names.index(n) for n, _ in mixture.picks], long_examples=recipe.format.long_examples,
                          where=where)
            records = tuple(loaded[n][i] for n, i in mixture.picks) if stage.objective is not None else ()
            stages.append(PreparedStage(stage, mixture, examples, packed, records=records))
        else:
            packed, groups = pack_groups(mixture, examples, names, stage.mixing.validation, recipe, pad_id, where)
            stages.append(PreparedStage(stage, mixture, examples, packed, groups))
    return PreparedData(stages, names, tokenizer, selected)


def load_sources(recipe: Recipe, base_dir: str | Path) -> tuple[dict[str, list[dict]], dict[int, str]]:
    """Every source's records, and where each came from (``file:line`` ...) by the record's ``id``:
    subsetting and selection keep the record objects. A streamed source is a
    :class:`~mixtune.data.stream.StreamedSource` (records read on demand; it names them itself).
    The problems of all sources are reported together, in one error."""
    from mixtune.data.stream import open_streamed

    loaded, origin, problems = {}, {}, []
    for name, cfg in recipe.sources.items():
        try:
            if cfg.stream:
                loaded[name] = open_streamed(name, cfg, base_dir)
                continue
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
    ``where`` names each example in errors (default: its source and 1-based record number).
    Streamed examples (:class:`~mixtune.data.tokens.StageExamples`) have their training rows written
    to files in one pass (:func:`~mixtune.data.packed_files.pack_to_disk`); validation rows stay in memory."""
    import numpy as np
    import torch

    from mixtune.data.mixture import PickNames
    from mixtune.data.packed_files import Part, pack_to_disk
    from mixtune.data.tokens import StageExamples

    streamed = isinstance(examples, StageExamples)
    if streamed:  # picks are arrays (mixture.Picks): select by source without a Python object per pick
        ids = np.array([names.index(n) for n in mixture.picks.names], dtype=np.int64)[mixture.picks.source]
        order = [n for n in names if bool((ids == names.index(n)).any())]
        where = where or PickNames(mixture.picks, lambda n, i: f"source {n!r} record {i + 1}")
    else:
        order = [n for n in names if any(p[0] == n for p in mixture.picks)]
        where = where or [f"source {n!r} record {i + 1}" for n, i in mixture.picks]
    parts, rows, val, start, offset = [], [], [], 0, 0
    for name in order:
        mine = (np.flatnonzero(ids == names.index(name)) if streamed
                else [i for i, (n, _) in enumerate(mixture.picks) if n == name])
        if len(mine) <= n_val:
            raise ConfigError(f"mixing: source {name!r} has {len(mine)} examples in this stage, not more than "
                              f"mixing.validation = {n_val} held out for validation")
        held, train_ = mine[:n_val], mine[n_val:]
        kw = dict(pad_id=pad_id, long_examples=recipe.format.long_examples)
        if streamed:
            parts.append(Part(examples.take(train_), np.full(len(train_), names.index(name)), where.take(train_), offset))
        else:
            p = pack([examples[i] for i in train_], recipe.format.seq_len, sources=[names.index(name)] * len(train_),
                     where=[where[i] for i in train_], **kw)
            n = p.input_ids.shape[0]
            parts.append(dataclasses.replace(p, example_ids=torch.where(p.example_ids >= 0, p.example_ids + offset, -1)))
            rows.append(torch.arange(start, start + n))
            start += n
        val.append(pack([examples[i] for i in held], recipe.format.seq_len, sources=[names.index(name)] * len(held),
                        where=[where[i] for i in held], **kw))
        offset += len(train_)
    if streamed:
        packed, counts = pack_to_disk(parts, recipe.format.seq_len, pad_id=pad_id,
                                      long_examples=recipe.format.long_examples)
        starts = np.cumsum([0, *counts]).tolist()
        return packed, Groups(order, [torch.arange(a, a + n) for a, n in zip(starts, counts)], val)
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
    from mixtune.train.post_sft import objective_length

    text = dump_config(recipe)
    out = []
    for st in data.stages:
        c = st.config
        if c.objective is None:
            steps = stage_steps(st.packed.input_ids.shape[0], recipe.train, steps=c.steps, epochs=c.epochs)
        else:  # an objective stage's length counts its prompts
            steps = objective_length(len(st.records), recipe.train, c.objective, steps=c.steps, epochs=c.epochs)
        out.append(StageData(c.name, st.packed, steps, c.lr or recipe.train.lr, c.schedule or recipe.train.schedule,
                             c.mixing, st.groups, text, c.objective, st.records,
                             tuple(data.source_names.index(n) for n, _ in st.mixture.picks) if st.records else ()))
    return out


def start_model(model: str, *, seed: int, folder: Path) -> Path:
    """The folder training starts from: ``model`` itself for a local folder; for ``builtin:SIZE``,
    ``folder``, where the built-in model is created (seeded) unless it is already there."""
    if not model.startswith("builtin:"):
        return Path(model)
    if not (folder / "config.json").exists():
        init_builtin(folder, size=model.removeprefix("builtin:"), seed=seed, overwrite=True)
    return folder


@dataclass(frozen=True)
class TrainNode:
    """A graph node that trains one stage: the last of ``plans``, the stages of one training call
    (a segment: one method, one starting model). The stages before it are done: their exports are
    ``before``, which ``work/stages/`` holds or links to, so the loop resumes after them exactly as
    a run killed between stages does (the same weights as training them in one go: tested)."""

    key: str
    start: Path
    """The model the segment's first stage starts from (an adapter folder is applied in memory)."""
    plans: tuple[StageData, ...]
    before: tuple[Path, ...]
    """Exported folders of ``plans[:-1]``."""
    train: TrainConfig
    options: RunOptions
    seed: int
    source_names: tuple[str, ...]
    work: Path
    """The loop's ``out_dir``: ``log.jsonl``, ``checkpoints/``, ``stages/<name>/``."""
    first_stage: int = 0
    """The position of ``plans[0]`` in the whole run (see :func:`mixtune.train.loop.train`)."""
    base_name: str | None = None
    """The base an exported adapter records (``model.name_or_path``); default: ``start``'s path."""
    base_dir: Path = Path(".")
    """Where ``options.eval``'s task files are looked up."""
    load: LoadConfig = LoadConfig()
    """How ``start`` is loaded (dtype, attention kernel, quantisation)."""


def train_stage(node: TrainNode, *, accelerator=None, progress: bool = True, on_step=None) -> Path:
    """Run a :class:`TrainNode`: load its starting model, link the exports it resumes after, train
    its stage through the loop; returns the stage's exported folder (``work/stages/<name>``).
    The one function that trains, for ``mixtune train`` and ``mixtune study`` alike."""
    from mixtune.eval import load_for_eval
    from mixtune.train.loop import make_accelerator

    acc = accelerator or make_accelerator(node.train.precision)
    if acc.is_main_process:
        for plan, folder in zip(node.plans, node.before):
            link = node.work / "stages" / plan.name
            if not link.exists() and not link.is_symlink():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(Path(folder).resolve(), target_is_directory=True)
    acc.wait_for_everyone()
    model, tokenizer = load_for_eval(node.start, load=node.load)  # an adapter folder: applied to its base in memory
    if node.base_name is not None:
        model.name_or_path = node.base_name
    evaluator = None
    if node.options.eval is not None:
        from mixtune.eval import during_training

        evaluator = during_training(node.options.eval, tokenizer, node.base_dir)
    exported = train(model, tokenizer, list(node.plans), node.train, node.work, options=node.options,
                     source_names=list(node.source_names), seed=node.seed, accelerator=acc, resume=True,
                     progress=progress, on_step=on_step, first_stage=node.first_stage, known=len(node.before),
                     evaluator=evaluator)
    return exported[-1]


def recipe_graph(recipe: Recipe, data: PreparedData, start: Path, out_dir: Path,
                 base_dir: Path = Path(".")) -> list[tuple[Node, TrainNode]]:
    """``mixtune train``'s graph: one path, a node per stage, keyed by the stage's name."""
    plans = stage_plan(recipe, data)
    folders = [out_dir / "stages" / p.name for p in plans]
    return [(Node(p.name, "train", (plans[i - 1].name,) if i else (), f"stage {i + 1}/{len(plans)} {p.name}"),
             TrainNode(p.name, start, tuple(plans[:i + 1]), tuple(folders[:i]), recipe.train, recipe.run, recipe.seed,
                       tuple(data.source_names), out_dir, base_dir=Path(base_dir), load=recipe.load))
            for i, p in enumerate(plans)]


def run_training(recipe: Recipe, base_dir: Path, out_dir: Path, *, resume: bool = True, progress: bool = True,
                 accelerator=None, on_step=None) -> list[Path]:
    """Prepare the data, build the base model, train every stage (a one-path graph, run by the
    function a study's training nodes use); returns the stage model folders.

    Without ``resume``, what an earlier run left in ``out_dir`` (stages, checkpoints, best weights,
    log) is deleted first."""
    from mixtune.graph import run_graph
    from mixtune.train.checkpoint import exported_stages, note_resumed, start_over
    from mixtune.train.loop import TrainLog, make_accelerator

    acc = accelerator or make_accelerator(recipe.train.precision)
    # every data problem is found before anything is written (selection needs the model: it comes after)
    selecting = any(src.select is not None for src in recipe.sources.values())
    data = None if selecting else prepare_data(recipe, base_dir)
    if acc.is_main_process:
        start_model(recipe.model, seed=recipe.seed, folder=out_dir / "base")  # built once, before the others look
    acc.wait_for_everyone()
    start = start_model(recipe.model, seed=recipe.seed, folder=out_dir / "base")
    if data is None:
        from mixtune.models import load_tokenizer

        data = prepare_data(recipe, base_dir, tokenizer=load_tokenizer(start), select_with=start)
    nodes = recipe_graph(recipe, data, start, out_dir, base_dir)
    log = TrainLog(out_dir / "log.jsonl", enabled=acc.is_main_process, echo=progress)
    folders = [out_dir / "stages" / n.key for n, _ in nodes]
    if not resume:
        start_over(acc, out_dir, [n.key for n, _ in nodes], log)
    elif done := exported_stages(folders):
        note_resumed(log, folders, [t.plans[-1].steps for _, t in nodes], done)
    by_key = dict((n.key, t) for n, t in nodes)
    folder = dict(zip(by_key, folders))
    run_graph([n for n, _ in nodes], done=lambda n: exported_stages([folder[n.key]]) == 1,
              execute=lambda n: train_stage(by_key[n.key], accelerator=acc, progress=progress, on_step=on_step))
    return folders


class _Timed(Exception):
    """Raised from the loop's step callback once enough steps are timed (nothing is exported)."""


def estimate_seconds(recipe: Recipe, data: PreparedData, plans: list[StageData], *, steps: int = 4,
                     cpu_limit_bytes: int = 2 * 2**30) -> float | str:
    """Seconds the recipe's training steps will take here, on one process: the median of a few real
    optimizer steps of the first stage (after one warm-up step), through the one loop, times the steps
    of every stage. Validation passes of mixed stages, evaluations during training (``run.eval``)
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
        model, tokenizer = load_model(start_model(recipe.model, seed=recipe.seed, folder=work / "base"), load=recipe.load)
        stamps: list[float] = []

        def on_step(_step: int) -> None:
            stamps.append(time.perf_counter())
            if len(stamps) > steps:
                raise _Timed

        first = dataclasses.replace(plans[0], steps=steps + 2)
        try:
            train(model, tokenizer, [first], recipe.train, work / "run", source_names=data.source_names,
                  seed=recipe.seed, resume=False, progress=False, on_step=on_step)
        except _Timed:
            pass
        per_step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return per_step * sum(p.steps for p in plans)
