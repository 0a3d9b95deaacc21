"""Studies: a grid of runs, each stage prefix trained once, scores in SQLite, resumable.

A study lists strategies (list-valued parameters expand: ``k: [0, 0.125]``), optional one-source
specialists, seeds and data amounts. Every run is a list of stages (the study's ``prefix``
stages, then the strategy's). A stage is identified by a hash of everything that decides its
weights: the model, seed, amount, sources, format and training settings, and the stage configs
up to and including it. Runs that share a prefix (mixed-sequential and every DMT k share stage 1;
a specialist and sequential training share their first stage) train it once. ``merges`` merge
trained runs (a grid of parameters, or the point a search on validation problems picks) into runs
of their own, scored beside the trained ones (:mod:`mixtune.study_merges`).

Scores are keyed by everything that decides them (:func:`eval_key`): the model's key, the
ability's name and version (and its content hash, for an ability with one, such as a task file),
and the study's ``eval`` settings that change the problems or the answers: ``n``, ``seed``,
``difficulty``, ``condition`` and the decoding (greedy), and any field added to :class:`EvalConfig`
later except those in :data:`HOW_EVAL_RUNS` (``batch_size``, ``abilities``). Changing any of them
evaluates again; changing it back shows the earlier scores without evaluating. Every score keeps
its per-problem scores (table ``items``), so it carries its standard error and two runs can be
compared problem by problem (:mod:`mixtune.report.paired`).

A study folder from before scores were keyed this way has a ``scores`` table keyed by (model,
ability, metric) only, without the seed, difficulty or condition it was measured with. Those rows
cannot be told apart from scores of other settings (the bug this keying fixes), so they are never
shown: on opening, the table is renamed ``legacy_scores`` (kept, not read) and the next
``mixtune study`` evaluates the models again; the trained models are reused.

Layout of ``DIR``::

    results.sqlite   stages, runs, evals (one row per score: model x ability x evaluation settings x
                     metric, with its standard error), items (per-problem scores of each), losses,
                     searches (each merge search's grid points: validation scores and the choice),
                     and meta: the first invocation's title, notes, machine and start time, and the
                     minutes of every invocation summed (a rerun or ``mixtune report`` keeps them)
    scores.csv       one row per run x ability x metric for the study's current ``eval`` settings,
                     with the score's standard error (``se``), the evaluation settings (``eval_seed``,
                     ``difficulty``, ``condition``, ``eval_key``), the run's parameters, seed and model
                     folder (``model_dir``, relative to ``DIR``) and readable link (``link``)
    models/<key>/    the model after each trained stage, and each merge (``merge-<hash>``)
    evals/<eval key>/  scores.json and outputs.jsonl (every problem's prompt, output and score)
    runs/<name>      a relative link to the model each run ends with, ``runs/dmt-k0.125 ->
                     ../models/<key>``; see :func:`link_names` for the names
    work/<key>/      a stage being trained (checkpoints; resumed if interrupted)
    logs/<key>.log   each node's output, when the study runs on Ray (``--ray``; :mod:`mixtune.graph`)
    analysis/        the ``analysis`` section's results, one JSON file per node (``<method>-<hash>.json``;
                     conjugate scores are scores, in ``evals/``), and adapters' merged models (``full/``)
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import platform
import re
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import Field, TypeAdapter, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from mixtune.core import ConfigError, Strict, atomic_write_text, dump_config
from mixtune.data.abilities import ABILITIES
from mixtune.data.format import FormatConfig
from mixtune.data.sources import SourceConfig
from mixtune.models import LoadConfig
from mixtune.recipe import Recipe
from mixtune.strategy import StageConfig, StrategyConfig, plan_stages
from mixtune.study_analysis import AnalysisConfig
from mixtune.study_merges import MergeEntry, check_merges
from mixtune.train.config import RunOptions, TrainConfig
from mixtune.train.methods import MethodConfig


class EvalConfig(Strict):
    """What every model in a study is scored on."""

    abilities: list[str] = ["math", "code", "general"]
    """Built-in abilities (scored on their held-out test split) and task files (YAML, relative to the
    study file: every ability a file defines, see :mod:`mixtune.eval.tasks`; lm-eval task files too)."""
    n: int = Field(default=200, ge=1)
    """Problems per ability."""
    difficulty: int = Field(default=1, ge=1, le=3)
    """Difficulty level 1-3 of the held-out problems."""
    seed: int = 0
    """Which held-out problems (the same for every model)."""
    batch_size: int = Field(default=64, ge=1)
    """Prompts per generation batch."""
    condition: str | None = None
    """C-RLFT inference condition: the class tag every prompt carries (e.g. the expert source's)."""


class StudyConfig(Strict):
    """A study recipe."""

    DOCS: ClassVar[str] = "docs/recipes.md"

    model: str = "builtin:tiny"
    """Starting model, as in a training recipe."""
    load: LoadConfig = LoadConfig()
    """How the starting model is loaded (dtype, attention kernel, quantisation), as in a training recipe."""
    sources: dict[str, SourceConfig] = Field(min_length=1)
    """Named data sources, as in a training recipe."""
    format: FormatConfig = FormatConfig()
    """Rendering and packing, as in a training recipe."""
    train: TrainConfig = TrainConfig()
    """How every stage is trained, as in a training recipe."""
    run: RunOptions = RunOptions()
    """How each stage's training goes, as in a training recipe (never retrains a stage)."""
    prefix: list[StageConfig] = []
    """Stages every run starts with (e.g. format pretraining); the model after them is the base."""
    specialists: list[str] = []
    """Sources to train alone, one run each (the specialists forgetting is measured against)."""
    strategies: list[dict] = []
    """Strategy configs; a list-valued parameter gives one run per value, e.g. ``{name: dmt, k: [0, 0.125]}``."""
    methods: list[MethodConfig] = []
    """Tuning methods to compare: every run but the base is repeated once per method (its stages
    after the prefix train with it; the prefix trains with ``train.method``). Empty: ``train.method``
    only. Adapter stages are saved as adapters (``merge: true`` adds a full model in ``merged/``);
    the next stage and the evaluation apply them in memory to the model they adapt."""
    method_lr: dict[str, float] = {}
    """Peak learning rate per method name in ``methods`` (default ``train.lr``): adapters and sparse
    methods usually want a larger one than full fine-tuning."""
    seeds: list[int] = [0]
    """Seeds; every run is repeated once per seed."""
    amounts: list[float] = [1.0]
    """Share of every non-prefix source to use (data-scaling curves when several)."""
    merges: list[MergeEntry] = []
    """Merged models of the study's runs, scored beside them, e.g. ``{method: ties_paper, of:
    [specialist:math, specialist:code], grid: {density: [0.2, 0.5]}, search: {n: 50}}``
    (see :mod:`mixtune.study_merges`)."""
    eval: EvalConfig = EvalConfig()
    """What every model is scored on."""
    analysis: AnalysisConfig = AnalysisConfig()
    """What fine-tuning changed in each run, and why an ability was lost (:mod:`mixtune.study_analysis`):
    task-vector geometry, intruder dimensions, conjugate prompts, tuning contribution, skill
    localisation; e.g. ``{task_vectors: {}, conjugate: {transforms: [frame]}}``. None by default."""

    @model_validator(mode="after")
    def _quantized(self) -> StudyConfig:
        from mixtune.train.methods.base import refuse_quantized

        try:
            for m in [self.train.method, *self.methods]:
                refuse_quantized(self.load.quantization, m.name)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self

    @model_validator(mode="after")
    def _analysis_runs(self) -> StudyConfig:
        from mixtune.study_analysis import check_analysis

        problems = check_analysis(self.analysis, [r.name for r in expand(self)])
        if problems:  # each at its own key (analysis.conjugate.runs.0), so the message gives its line
            raise ValidationError.from_exception_data("StudyConfig", [
                InitErrorDetails(type=PydanticCustomError("analysis_run", "{msg}", {"msg": msg}), loc=loc,
                                 input=_at(self.model_dump(by_alias=True), loc)) for loc, msg in problems])
        return self

    @model_validator(mode="after")
    def _merges(self) -> StudyConfig:
        if not self.merges:
            return self
        problems = check_merges(self, [r.name for r in expand(self)])
        if problems:  # each at its own key (merges.0.of.1), so the message gives its line
            raise ValidationError.from_exception_data("StudyConfig", [
                InitErrorDetails(type=PydanticCustomError("merge_run", "{msg}", {"msg": msg}), loc=loc,
                                 input=_at(self.model_dump(by_alias=True), loc)) for loc, msg in problems])
        return self


def _at(data, loc: tuple):
    """The value at ``loc`` in nested dicts and lists (None where absent)."""
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


@dataclass(frozen=True)
class Run:
    name: str
    strategy: str
    params: dict
    seed: int
    amount: float
    stages: list[StageConfig]
    method: dict | None = None
    """The tuning method of the stages after the prefix (None: the study's ``train.method``)."""

    @property
    def id(self) -> str:
        return f"{self.name}|seed={self.seed}|amount={self.amount:g}"


def expand(study: StudyConfig) -> list[Run]:
    """Every run of the grid: base, specialists, strategy variants; times seeds and amounts."""
    prefix_only = {s for st in study.prefix for s in st.mixture.sources}
    sources = [s for s in study.sources if s not in prefix_only]  # what the strategies compose
    variants: list[tuple[str, str, dict, list[StageConfig]]] = [("base", "base", {}, [])]
    for s in study.specialists:
        if s not in study.sources:
            raise ConfigError(f"specialists names {s!r}, not a source ({', '.join(study.sources)})")
        variants.append((f"specialist:{s}", "sequential", {"order": [s]},
                         plan_stages(_strategy({"name": "sequential", "order": [s]}), sources)))
    for spec in study.strategies:
        listed = {k: v for k, v in spec.items() if isinstance(v, list) and not _takes_list(spec.get("name"), k)}
        for combo in itertools.product(*listed.values()) if listed else [()]:
            params = spec | dict(zip(listed, combo))
            strategy = _strategy(params)
            label = ",".join(f"{k}={_compact(v)}" for k, v in params.items() if k != "name" and k in listed)
            name = f"{params['name']}({label})" if label else params["name"]
            variants.append((name, params["name"], {k: v for k, v in params.items() if k != "name"},
                             plan_stages(strategy, sources)))
    variants = _distinct_names(variants)
    methods = [m.model_dump(mode="json") for m in study.methods] or [None]
    return [Run(name if method is None or not stages else f"{name} [{method_label(method)}]", strat, params, seed,
                amount, [*study.prefix, *stages], method if stages else None)
            for seed in study.seeds for amount in study.amounts for method in methods
            for name, strat, params, stages in variants if stages or method == methods[0]]


def _distinct_names(variants: list[tuple]) -> list[tuple]:
    """Runs of one strategy listed twice with the same name (e.g. ``post_sft`` with two objectives)
    are named by the parameters that tell them apart: ``post_sft(objective=rft,lr=0.0005)``."""
    by_name: dict[str, list[int]] = {}
    for i, (name, *_rest) in enumerate(variants):
        by_name.setdefault(name, []).append(i)
    out = list(variants)
    for name, idx in by_name.items():
        if len(idx) < 2:
            continue
        keys = sorted({k for i in idx for k in variants[i][2]})
        differ = [k for k in keys if len({json.dumps(variants[i][2].get(k), sort_keys=True) for i in idx}) > 1]
        for i in idx:
            label = ",".join(f"{k}={_compact(variants[i][2][k])}" for k in differ if k in variants[i][2])
            out[i] = (f"{name.split('(')[0]}({label})" if "(" not in name else f"{name[:-1]},{label})",
                      *variants[i][1:])
    return out


def _takes_list(strategy: str | None, key: str) -> bool:
    """Whether a strategy's parameter is itself a list (sequential's ``order``), so a list value is
    one value, not one run per element."""
    import types
    import typing

    from mixtune.strategy import STRATEGIES

    if strategy not in STRATEGIES:
        return False
    field = STRATEGIES.get(strategy).params.model_fields.get(key)
    if field is None:
        return False
    ann = field.annotation
    args = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
    return any(typing.get_origin(a) is list for a in args)


def method_label(method: dict) -> str:
    """``lora(r=4)``: the method's name and the parameters that differ from its defaults."""
    from mixtune.train.methods import TUNERS

    defaults = TUNERS.get(method["name"]).params().model_dump(mode="json") if method["name"] != "peft" else {}
    changed = [f"{k}={v}" for k, v in method.items() if k != "name" and defaults.get(k) != v]
    return f"{method['name']}({','.join(changed)})" if changed else method["name"]


def _compact(v) -> str:
    """A parameter value as a short run label: 0.125, static(math:0.25,general:0.5), aioli(eta:0.1)."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict):
        inner = ",".join(f"{k}:{_compact(x)}" if not isinstance(x, dict) else ",".join(
            f"{kk}:{_compact(xx)}" for kk, xx in x.items()) for k, x in v.items() if k != "name")
        return f"{v.get('name', '')}({inner})" if inner else str(v.get("name", ""))
    return str(v)


def _strategy(spec: dict):
    try:
        return TypeAdapter(StrategyConfig).validate_python(spec)
    except Exception as e:  # pydantic's message names the field
        raise ConfigError(f"study strategy {spec}: {e}") from None


def run_method(study: StudyConfig, run: Run) -> dict | None:
    """What differs in how ``run`` trains after the prefix: its method and learning rate, when they
    are not the study's ``train`` settings (None when they are, so such runs share stages)."""
    if run.method is None:
        return None
    lr = study.method_lr.get(run.method["name"], study.train.lr)
    if run.method == study.train.method.model_dump(mode="json") and lr == study.train.lr:
        return None
    return {"method": run.method, "lr": lr}


def stage_keys(study: StudyConfig, run: Run) -> list[str]:
    """One key per stage of ``run``: a hash of everything that decides the weights after it."""
    common = {"model": study.model, "seed": run.seed, "amount": run.amount,
              "sources": {k: v.model_dump(mode="json") for k, v in study.sources.items()},
              "format": study.format.model_dump(mode="json"),
              # compile and fused_loss left out when off, so keys from before they existed stay valid
              "train": study.train.model_dump(mode="json", exclude={k for k in ("compile", "fused_loss")
                                                                    if getattr(study.train, k) is None}),
              "prefix_len": len(study.prefix)}
    if study.load != LoadConfig():  # it decides the weights (left out at its default, so older keys stay valid)
        common["load"] = study.load.model_dump(mode="json")
    keys, chain = [], []
    own = run_method(study, run)
    for i, st in enumerate(run.stages):
        # an SFT stage leaves its objective out, so keys from before objectives existed stay valid
        entry = st.model_dump(mode="json", exclude={"name"} | ({"objective"} if st.objective is None else set()))
        if own is not None and i >= len(study.prefix):
            entry |= own
        chain.append(entry)
        blob = json.dumps(common | {"stages": chain}, sort_keys=True)
        keys.append(hashlib.sha256(blob.encode()).hexdigest()[:16])
    return keys


HOW_EVAL_RUNS = frozenset({"abilities", "batch_size"})
"""Fields of :class:`EvalConfig` that do not decide a score (which abilities are asked for, how
many prompts are batched), so they are not part of :func:`eval_key`; every other field is."""

GREEDY = {"do_sample": False}
"""The decoding of every study evaluation today: greedy."""


def ability_identity(name: str, ability=None) -> dict:
    """What identifies an ability's problems and scorer: its name, its ``version`` and, for an ability
    with content of its own (a task file's data), its content hash: the ability's ``content_hash``
    (an attribute or a method), else its ``fingerprint()``, else :func:`mixtune.eval.tasks.fingerprint`
    for a task from a file. ``ability`` defaults to the built-in of that name."""
    if ability is None:
        ability = ABILITIES.get(name)
    ident = {"name": name, "version": getattr(ability, "version", None)}
    content = getattr(ability, "content_hash", None)
    if content is None and hasattr(ability, "fingerprint"):
        content = ability.fingerprint
    if callable(content):
        content = content()
    if content is None:
        from mixtune.eval import tasks

        if hasattr(ability, "model_dump"):  # a task from a file: its settings and its data's bytes
            content = tasks.fingerprint(ability)
    if content is not None:
        ident["content"] = content
    return ident


def eval_settings(ability: dict, *, n: int, seed: int, difficulty: int, condition: str | None,
                  decoding: dict | None = None, **more) -> dict:
    """Everything besides the model that decides a score: the ability (:func:`ability_identity`),
    the problems (``n``, ``seed``, ``difficulty``), the prompt (``condition``), the decoding
    (default :data:`GREEDY`) and ``more`` (further settings that decide it, by name)."""
    return {"ability": ability, "n": n, "seed": seed, "difficulty": difficulty, "condition": condition,
            "decoding": GREEDY if decoding is None else decoding} | more


def eval_key(model_key: str | None, settings: dict) -> str:
    """The key of a score: a hash of the model key and :func:`eval_settings`. With ``model_key`` None,
    the key of the problems alone (the same for every model scored with ``settings``): scores with
    the same such key are on the same problems, in the same order, and can be paired."""
    blob = json.dumps({"model": model_key, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def study_abilities(e: EvalConfig) -> tuple[list[str], dict]:
    """The ability names ``eval.abilities`` stands for (a task file: every ability it defines, in its
    place) and the abilities from files by name."""
    from mixtune.eval.tasks import tasks_in

    names, tasks = tasks_in(list(e.abilities))
    return names, dict(tasks)


def study_eval_settings(e: EvalConfig, ability: str, impl=None) -> dict:
    """:func:`eval_settings` of ``ability`` under a study's ``eval`` config: every field but those of
    :data:`HOW_EVAL_RUNS`, so a field added to :class:`EvalConfig` that changes scores is keyed too."""
    fields = e.model_dump(mode="json", exclude=set(HOW_EVAL_RUNS))
    return eval_settings(ability_identity(ability, impl), **fields)


def reset_peak_rss() -> None:
    """Start a new peak-memory window for this process (Linux: /proc/self/clear_refs; elsewhere a no-op)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process since :func:`reset_peak_rss`, in MiB (None where unknown)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


SCHEMA = """
CREATE TABLE IF NOT EXISTS stages (key TEXT PRIMARY KEY, parent TEXT, name TEXT, steps INTEGER, seconds REAL,
    trainable INTEGER, optimizer_bytes INTEGER, peak_rss_mb REAL);
CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, name TEXT, strategy TEXT, params TEXT, seed INTEGER,
    amount REAL, stage_keys TEXT, final_key TEXT);
CREATE TABLE IF NOT EXISTS evals (eval_key TEXT, metric TEXT, model_key TEXT, ability TEXT, problems_key TEXT,
    settings TEXT, value REAL, se REAL, n INTEGER, version INTEGER, higher_is_better INTEGER,
    PRIMARY KEY (eval_key, metric));
CREATE TABLE IF NOT EXISTS items (eval_key TEXT, item INTEGER, score REAL, PRIMARY KEY (eval_key, item));
CREATE TABLE IF NOT EXISTS losses (stage_key TEXT, step INTEGER, source TEXT, loss REAL);
CREATE TABLE IF NOT EXISTS mixing (stage_key TEXT, step INTEGER, source TEXT, proportion REAL);
CREATE TABLE IF NOT EXISTS val_losses (stage_key TEXT, source TEXT, loss REAL, PRIMARY KEY (stage_key, source));
CREATE TABLE IF NOT EXISTS train_evals (stage_key TEXT, step INTEGER, ability TEXT, score REAL);
CREATE TABLE IF NOT EXISTS planned (key TEXT PRIMARY KEY, steps INTEGER);
CREATE TABLE IF NOT EXISTS searches (run_id TEXT, point INTEGER, name TEXT, params TEXT, model_key TEXT, scores TEXT,
    objective REAL, chosen INTEGER, PRIMARY KEY (run_id, point));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


def link_names(runs: list[tuple[str, int, float]]) -> list[str]:
    """A safe, unique, readable file name per ``(run name, seed, amount)``, for ``runs/<name>``.

    The run name with ``=`` dropped and every other run of characters but letters, digits, ``.``
    and ``_`` made one ``-`` (``dmt(k=0.125)`` -> ``dmt-k0.125``, ``specialist:math`` ->
    ``specialist-math``, ``sequential [lora(r=2)]`` -> ``sequential-lora-r2``); then ``-seed<S>``
    when the runs have several seeds and ``-amount<A>`` when several amounts. A name over 80
    characters is cut and ends with a hash of the run; a name taken by an earlier run gets ``-2``,
    ``-3``, ...
    """
    several_seeds, several_amounts = len({s for _, s, _ in runs}) > 1, len({a for *_, a in runs}) > 1
    out: list[str] = []
    for name, seed, amount in runs:
        safe = re.sub(r"[^A-Za-z0-9._]+", "-", name.replace("=", "")).strip("-.") or "run"
        safe += (f"-seed{seed}" if several_seeds else "") + (f"-amount{amount:g}" if several_amounts else "")
        if len(safe) > 80:
            safe = safe[:71] + "-" + hashlib.sha256(f"{name}|{seed}|{amount}".encode()).hexdigest()[:8]
        unique, i = safe, 1
        while unique in out:
            i += 1
            unique = f"{safe}-{i}"
        out.append(unique)
    return out


class StudyProgress:
    """Overall progress over a study's stages to train: a line at each stage start, ``stage 3/11 ·
    812/2950 steps (28%) · ETA 4.1 min``, the ETA from the steps trained so far in this invocation."""

    def __init__(self, steps: dict[str, int], log) -> None:
        self.steps, self.log = steps, log
        self.total = sum(steps.values())
        self.finished: list[str] = []
        self.current, self.current_done, self.executed = None, 0, 0
        self.t0 = time.perf_counter()

    @property
    def done(self) -> int:
        return sum(self.steps[k] for k in self.finished) + self.current_done

    def eta_minutes(self) -> float | None:
        """Minutes left at this invocation's pace (wall time per trained step), None before a step."""
        if not self.executed:
            return None
        return (time.perf_counter() - self.t0) / self.executed * (self.total - self.done) / 60

    def line(self) -> str:
        eta = self.eta_minutes()
        return (f"study: stage {min(len(self.finished) + 1, len(self.steps))}/{len(self.steps)} · "
                f"{self.done}/{self.total} steps ({self.done / max(self.total, 1):.0%}) · "
                + (f"ETA {eta:.1f} min" if eta is not None else "ETA after the first steps"))

    def start(self, key: str) -> None:
        self.current, self.current_done = key, 0
        self.log(self.line())

    def on_step(self, step: int) -> None:
        """The loop's ``on_step`` hook: ``step`` is the stage's step count (it trains one stage)."""
        self.current_done, self.executed = step, self.executed + 1

    def finish(self, key: str) -> None:
        if key in self.steps and key not in self.finished:
            self.finished.append(key)
        self.current, self.current_done = None, 0
        if len(self.finished) == len(self.steps):
            self.log(f"study: trained {len(self.finished)} stages, {self.total} steps, "
                     f"in {(time.perf_counter() - self.t0) / 60:.1f} min")


class Study:
    """A study folder and its results database."""

    def __init__(self, cfg: StudyConfig, out_dir: Path, *, base_dir: Path = Path("."), progress: bool = True,
                 log=print, jobs: int = 1, ray=None) -> None:
        # task files are named by absolute path from here on, so study.yaml (and `mixtune report`) finds them
        entries = [a if not a.endswith((".yaml", ".yml")) else str((Path(base_dir) / a).resolve())
                   for a in cfg.eval.abilities]
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"abilities": entries})})
        if cfg.run.eval is not None and cfg.run.eval.keep_best is not None:
            raise ConfigError("run.eval.keep_best is for `mixtune train`: a study's next stage and its evaluation "
                              "take each stage's last weights; leave keep_best out (the curves are still recorded)")
        self.cfg, self.out, self.base_dir, self.progress, self.log = cfg, Path(out_dir), base_dir, progress, log
        self.tracker: StudyProgress | None = None
        self.jobs = jobs
        self.ray = ray  # a mixtune.graph.RayOptions: every node a Ray task
        self._prepared: dict[str, tuple] = {}
        self._actions: dict[str, tuple] = {}
        self._records: list[tuple] = []
        self.abilities, self.tasks = study_abilities(cfg.eval)
        self.out.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.out / "results.sqlite", timeout=300)  # --jobs: several processes write
        self.db.executescript(SCHEMA)
        have = {row[1] for row in self.db.execute("PRAGMA table_info(stages)")}
        for column, kind in [("trainable", "INTEGER"), ("optimizer_bytes", "INTEGER"), ("peak_rss_mb", "REAL")]:
            if column not in have:  # a study folder from before these were recorded
                self.db.execute(f"ALTER TABLE stages ADD COLUMN {column} {kind}")
        self._retire_legacy_scores()
        atomic_write_text(self.out / "study.yaml", dump_config(cfg))

    def run(self, on_stage=None) -> None:
        """Train what is missing, evaluate what is unscored, export ``scores.csv``, link ``runs/``.

        The minutes this takes are added to the study's ``meta`` (also when interrupted)."""
        t0 = time.perf_counter()
        self._meta_default(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
                           started=time.strftime("%Y-%m-%d %H:%M %Z"))
        try:
            self._run(on_stage)
        finally:
            meta = self.meta()
            self._set_meta(minutes=meta.get("minutes", 0.0) + (time.perf_counter() - t0) / 60,
                           invocations=meta.get("invocations", 0) + 1)

    def _run(self, on_stage) -> None:
        from mixtune.graph import run_graph

        runs = expand(self.cfg)
        nodes = self.graph(runs)
        for args in self._records:
            self.record_run(*args)
        distinct = list(dict.fromkeys(n.key for n in nodes if n.kind == "train"))  # in training order
        todo = [k for k in distinct if not self._trained(k)]
        steps = self._planned_steps(runs, todo)
        self.log(f"study: {len(runs)} runs, {len(distinct)} distinct stages ({len(todo)} to train"
                 + (f", {sum(steps.values())} steps" if todo else "") + ")"
                 + ("; on Ray" if self.ray is not None else f"; {self.jobs} nodes at a time" if self.jobs > 1 else ""))
        self.tracker = StudyProgress(steps, self.log)

        def execute(node) -> None:
            self._actions[node.key][0]()
            if node.kind == "train" and on_stage is not None:
                on_stage(node.key)

        out, base = self.out, Path(self.base_dir)
        if self.ray is not None:  # a Ray worker's current folder is not ours
            out, base = out.resolve(), base.resolve()
        run_graph(nodes, done=lambda n: self._actions[n.key][1](), execute=execute, jobs=self.jobs,
                  worker=run_node, init=(open_worker, (str(out), str(base))), log=self.log, ray=self.ray,
                  logs=out / "logs")
        self.export_csv()
        self.link_runs()

    def graph(self, runs: list[Run] | None = None) -> list:
        """The study's nodes (:class:`mixtune.graph.Node`) in the order one process runs them: every
        run's stages (runs sharing a prefix share its nodes), the runs' evaluations, then the merges
        (and their searches) and theirs. Fills ``self._actions`` (per node key: run it, is it done)
        and ``self._records`` (the runs to record before anything runs)."""
        from mixtune.graph import Node
        from mixtune.study_analysis import analysis_nodes
        from mixtune.study_merges import merge_nodes

        runs = runs if runs is not None else expand(self.cfg)
        self._actions, self._records, nodes = {}, [], []
        for r in runs:
            keys = stage_keys(self.cfg, r)
            self._records.append((r.id, r.name, r.strategy, r.params, r.seed, r.amount, self._final_key(r), keys))
            for i, k in enumerate(keys):
                nodes.append(Node(k, "train", (keys[i - 1],) if i else (),
                                  f"{r.id}: stage {i + 1}/{len(keys)} {r.stages[i].name}"))
                self._actions.setdefault(k, (lambda r=r, i=i: self._train_stage(r, i), lambda k=k: self._trained(k)))
        for r in runs:
            nodes.append(self.eval_node(self._final_key(r), r))
        return nodes + merge_nodes(self, runs) + analysis_nodes(self, runs)

    def eval_node(self, key: str, run, *, node_key: str | None = None, needs: tuple[str, ...] | None = None,
                  model_key=None):
        """The node that scores model ``key`` (of ``run``) on the study's abilities; a search's
        evaluation passes ``model_key``, a function that reads the chosen model's key when it runs."""
        from mixtune.graph import Node

        node_key = node_key or "eval-" + key
        find = model_key or (lambda: key)
        self._actions.setdefault(node_key, (lambda: self._evaluate(find(), run),
                                            lambda: find() is not None and not self._missing_scores(find())))
        return Node(node_key, "eval", needs if needs is not None else self.needs(key), f"{run.id}: evaluate")

    @staticmethod
    def needs(*keys: str) -> tuple[str, ...]:
        """The graph nodes among model ``keys``: a starting model (``start-...``) is not a node."""
        return tuple(k for k in keys if not k.startswith("start-"))

    # -- metadata ---------------------------------------------------------------------------

    def meta(self) -> dict:
        """The study's metadata: ``title``, ``notes``, ``machine``, ``started`` (kept from the first
        invocation), ``minutes`` and ``invocations`` (summed over invocations), ``verdict``."""
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    def _set_meta(self, **values) -> None:
        self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?,?)", [(k, json.dumps(v)) for k, v in values.items()])
        self.db.commit()

    def _meta_default(self, **values) -> None:
        have = self.meta()
        self._set_meta(**{k: v for k, v in values.items() if k not in have})

    def describe(self, *, title: str, notes: list[str] = ()) -> None:
        """Name the study for its report: kept from the first invocation (a rerun keeps the original)."""
        self._meta_default(title=title, notes=list(notes))

    # -- training ---------------------------------------------------------------------------

    def _root_key(self, run: Run) -> str:
        return "start-" + hashlib.sha256(f"{self.cfg.model}|{run.seed}".encode()).hexdigest()[:10]

    def model_dir(self, key: str) -> Path:
        return self.out / "models" / key

    def _trained(self, key: str) -> bool:
        return (self.model_dir(key) / "mixtune.yaml").exists()

    def merged(self, key: str) -> bool:
        """Whether merge ``key``'s model is written (a merge writes its folder whole or not at all)."""
        return (self.model_dir(key) / "merge.yaml").exists()

    def final_model(self, run: Run) -> Path:
        """The folder of the model ``run`` ends with (its starting model when it has no stages)."""
        key = self._final_key(run)
        return self.model_path(key) if self._trained(key) else self._start_model(run)

    def record_run(self, run_id: str, name: str, strategy: str, params: dict, seed: int, amount: float,
                   final_key: str, keys: list[str] = ()) -> None:
        """Store a run (a trained one with its stage ``keys``, or a merge) under ``run_id``."""
        self.db.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?)",
                        (run_id, name, strategy, json.dumps(params), seed, amount, json.dumps(list(keys)), final_key))
        self.db.commit()

    def model_path(self, key: str) -> Path:
        """The model after stage ``key``: its ``merged/`` full model when the method wrote one, else the
        stage folder (a full model, or an adapter on the previous stage's model, which
        :func:`mixtune.eval.load_for_eval` applies)."""
        merged = self.model_dir(key) / "merged"
        return merged if (merged / "config.json").exists() else self.model_dir(key)

    def _train_config(self, run: Run, stage: int) -> TrainConfig:
        """The study's training settings, with the run's method after the prefix."""
        own = run_method(self.cfg, run)
        if own is None or stage < len(self.cfg.prefix):
            return self.cfg.train
        method = TypeAdapter(MethodConfig).validate_python(own["method"])
        return self.cfg.train.model_copy(update={"method": method, "lr": own["lr"]})

    def _start_model(self, run: Run) -> Path:
        from mixtune.pipeline import start_model

        return start_model(self.cfg.model, seed=run.seed, folder=self.model_dir(self._root_key(run)))

    def _final_key(self, run: Run) -> str:
        """The key of the model a run ends with (its starting model when it has no stages)."""
        keys = stage_keys(self.cfg, run)
        return keys[-1] if keys else self._root_key(run)

    def _recipe(self, run: Run, upto: int | None = None) -> Recipe:
        """The recipe of ``run``, or of its stages up to and including ``upto`` with that stage's
        training settings (what a stage's export records: the same for every run sharing it)."""
        if upto is None:
            return Recipe(seed=run.seed, model=self.cfg.model, load=self.cfg.load, sources=self.cfg.sources,
                          format=self.cfg.format, stages=run.stages or None, train=self.cfg.train)
        return self._recipe(run).model_copy(update={"stages": run.stages[:upto + 1],
                                                    "train": self._train_config(run, upto)})

    def _prepare(self, run: Run):
        """The run's starting model, recipe, prepared data and stage plans (kept for the run's next stage)."""
        from mixtune.models import load_tokenizer
        from mixtune.pipeline import prepare_data, stage_plan

        if run.id in self._prepared:
            return self._prepared[run.id]
        parent = self._start_model(run)
        recipe = self._recipe(run)
        data = prepare_data(recipe, self.base_dir, tokenizer=load_tokenizer(parent), select_with=parent,
                            amount=run.amount,
                            amount_skip={s for st in self.cfg.prefix for s in st.mixture.sources})
        self._prepared = {run.id: (parent, recipe, data, stage_plan(recipe, data))}  # the last run's only
        return self._prepared[run.id]

    def _planned_steps(self, runs: list[Run], todo: list[str]) -> dict[str, int]:
        """Steps of each stage in ``todo`` (for the overall progress): from the ``planned`` table, or
        by preparing the data of a run that has a stage not planned yet (its data only, no training)."""
        known = dict(self.db.execute("SELECT key, steps FROM planned"))
        for r in runs:
            keys = stage_keys(self.cfg, r)
            if any(k in todo and k not in known for k in keys):
                *_, plans = self._prepare(r)
                known |= {k: plan.steps for k, plan in zip(keys, plans)}
                self.db.executemany("INSERT OR REPLACE INTO planned VALUES (?,?)",
                                    [(k, plan.steps) for k, plan in zip(keys, plans)])
        self.db.commit()
        return {k: known[k] for k in todo}

    def _train_stage(self, run: Run, i: int) -> None:
        """Train stage ``i`` of ``run`` (its node): the segment it belongs to (the prefix, or the stages
        after it when the run has a method of its own) resumes after the stages before it, which
        the stage's work folder links to; the export is moved to ``models/<key>``."""
        from mixtune.pipeline import TrainNode, train_stage

        keys = stage_keys(self.cfg, run)
        key = keys[i]
        parent, _, data, plans = self._prepare(run)
        own = run_method(self.cfg, run) is not None and len(self.cfg.prefix) > 0
        first = len(self.cfg.prefix) if own and i >= len(self.cfg.prefix) else 0
        start = parent if first == 0 else self.model_path(keys[first - 1])
        train_cfg = self._train_config(run, i)
        segment = []
        for j in range(first, i + 1):
            plan = plans[j]
            if j >= len(self.cfg.prefix) and run.stages[j].lr is None:  # a method's own lr, unless the stage sets one
                plan = dataclasses.replace(plan, lr=train_cfg.lr)
            segment.append(dataclasses.replace(plan, recipe_text=dump_config(self._recipe(run, j))))
        dest = self.model_dir(key)
        # the base an adapter records: relative to the stage's own folder when it lies in the study, so
        # that a study folder can be moved or copied whole
        inside = Path(start).resolve().is_relative_to(self.out.resolve())
        base_name = (os.path.relpath(Path(start).resolve(), dest.resolve()) if inside else str(Path(start).resolve()))
        work = self.out / "work" / key
        node = TrainNode(key, Path(start), tuple(segment), tuple(self.model_dir(k) for k in keys[first:i]), train_cfg,
                         self.cfg.run, run.seed, tuple(data.source_names), work, first_stage=first,
                         base_name=base_name, base_dir=self.base_dir, load=self.cfg.load)
        tracker = self.tracker or StudyProgress({key: plans[i].steps}, self.log)
        offset = sum(p.steps for p in segment[:-1])  # the loop counts global steps from the segment's start
        tracker.start(key)
        self.log(f"{run.id}: training stage {i + 1}/{len(keys)} {plans[i].name} ({plans[i].steps} steps) -> {key}")
        t0 = time.perf_counter()
        reset_peak_rss()
        exported = train_stage(node, progress=self.progress, on_step=lambda g: tracker.on_step(g - offset))
        seconds, peak = time.perf_counter() - t0, peak_rss_mb()
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        exported.rename(dest)
        sizes = self._store_log(key, work / "log.jsonl")
        self.db.execute("INSERT OR REPLACE INTO stages VALUES (?,?,?,?,?,?,?,?)",
                        (key, keys[i - 1] if i else None, plans[i].name, plans[i].steps, seconds,
                         sizes.get("trainable_params"), sizes.get("optimizer_bytes"), peak))
        self.db.commit()
        shutil.copy2(work / "log.jsonl", dest / "train_log.jsonl")  # the stage's full log stays with its model
        shutil.rmtree(work, ignore_errors=True)
        tracker.finish(key)

    def _store_log(self, key: str, log_path: Path) -> dict:
        """Store a stage's training loss per source, and for mixed stages the proportions and
        validation losses; returns its size entry (trainable parameters, optimizer bytes)."""
        for table in ("losses", "mixing", "val_losses", "train_evals"):
            self.db.execute(f"DELETE FROM {table} WHERE stage_key = ?", (key,))
        rows, mix, val, evals, sizes = [], [], [], [], {}
        for line in log_path.read_text().splitlines():
            e = json.loads(line)
            if "trainable_params" in e and not sizes:
                sizes = e
            for name, v in e.items():
                if name.startswith("loss/"):
                    rows.append((key, e["stage_step"], name.removeprefix("loss/"), v))
                elif name.startswith("mix/"):
                    mix.append((key, e["stage_step"], name.removeprefix("mix/"), v))
                elif name.startswith("val_loss/"):
                    val.append((key, name.removeprefix("val_loss/"), v))
                elif name.startswith("eval/"):
                    evals.append((key, e["stage_step"], name.removeprefix("eval/"), v))
        self.db.executemany("INSERT INTO losses VALUES (?,?,?,?)", rows)
        self.db.executemany("INSERT INTO mixing VALUES (?,?,?,?)", mix)
        self.db.executemany("INSERT OR REPLACE INTO val_losses VALUES (?,?,?)", val)
        self.db.executemany("INSERT INTO train_evals VALUES (?,?,?,?)", evals)
        return sizes

    # -- evaluation -------------------------------------------------------------------------

    def _retire_legacy_scores(self) -> None:
        """A folder from before scores were keyed by their evaluation settings: rename its ``scores``
        table (keyed by model, ability and metric only) ``legacy_scores``, never shown (see the module
        docstring); its models are evaluated again by the next run."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(scores)")}
        if not columns or "eval_key" in columns:
            return
        (count,) = self.db.execute("SELECT COUNT(*) FROM scores").fetchone()
        self.db.execute("DROP TABLE IF EXISTS legacy_scores")
        self.db.execute("ALTER TABLE scores RENAME TO legacy_scores")
        self.db.commit()
        if count:
            self.log(f"study: {count} scores in {self.out / 'results.sqlite'} were stored without the evaluation "
                     "settings they were measured with (seed, difficulty, condition); they are kept as table "
                     "legacy_scores but not shown, and the next `mixtune study` evaluates the models again "
                     "(the trained models are reused)")

    def _eval_settings(self, ability: str) -> dict:
        """:func:`study_eval_settings` of ``ability`` under this study's ``eval`` config."""
        return study_eval_settings(self.cfg.eval, ability, self.tasks.get(ability))

    def _eval_keys(self, model_key: str) -> dict[str, str]:
        """Per ability of ``eval.abilities``, the :func:`eval_key` of ``model_key``'s score under the
        study's current evaluation settings."""
        return {a: eval_key(model_key, self._eval_settings(a)) for a in self.abilities}

    def _missing_scores(self, key: str) -> list[str]:
        """The abilities model ``key`` has no score of under the study's evaluation settings."""
        wanted = self._eval_keys(key)
        if not wanted:
            return []
        have = {k for (k,) in self.db.execute(
            f"SELECT eval_key FROM evals WHERE eval_key IN ({','.join('?' * len(wanted))})", list(wanted.values()))}
        return [a for a in self.abilities if wanted[a] not in have]

    def _evaluate(self, key: str, run) -> None:
        """Score model ``key`` (of ``run``, a :class:`Run` or a merge's) where it has no score under the
        study's evaluation settings."""
        from mixtune.eval import evaluate, load_for_eval

        e = self.cfg.eval
        wanted = self._eval_keys(key)
        missing = self._missing_scores(key)
        if not missing:
            return
        self.log(f"{run.id}: evaluating {', '.join(missing)} on {e.n} held-out problems each")
        model_dir = self.model_dir(key) if self.merged(key) else self.final_model(run)
        model, tokenizer = load_for_eval(model_dir)
        scores = evaluate(model, tokenizer, missing, n=e.n, seed=e.seed, difficulty=e.difficulty,
                          batch_size=e.batch_size, condition=e.condition, tasks=self.tasks)
        for a, sc in scores.items():
            self._store_score(wanted[a], key, self._eval_settings(a), sc, model_dir, run.id)
        self.db.commit()

    def _store_score(self, ek: str, key: str, settings: dict, sc, model_dir: Path, run_id: str) -> None:
        """Store ``sc`` (an :class:`~mixtune.eval.AbilityScore` of model ``key`` under ``settings``) as
        score ``ek``: ``evals/<ek>/``, its per-problem scores in ``items`` and its row in ``evals``."""
        from mixtune.eval import write_results
        from mixtune.report.paired import standard_error

        per_item = [float(x["score"]) for x in sc.examples]
        assert len(per_item) == sc.n, f"{sc.ability}: {len(per_item)} per-problem scores for n = {sc.n}"
        write_results({sc.ability: sc}, self.out / "evals" / ek,
                      {"model": str(model_dir), "model_key": key, "run": run_id, "eval_key": ek, "settings": settings})
        self.db.execute("DELETE FROM items WHERE eval_key = ?", (ek,))
        self.db.executemany("INSERT INTO items VALUES (?,?,?)", [(ek, i, x) for i, x in enumerate(per_item)])
        self.db.execute("INSERT OR REPLACE INTO evals VALUES (?,?,?,?,?,?,?,?,?,?,?)", (
            ek, "accuracy", key, sc.ability, eval_key(None, settings), json.dumps(settings, sort_keys=True), sc.score,
            standard_error(per_item), sc.n, sc.version, int(sc.higher_is_better)))

    def validation_scores(self, key: str | None, model_dir: Path, run_id: str, search) -> dict[str, float]:
        """Per ability, the score of model ``key`` (in ``model_dir``) on the validation problems of
        ``search`` (:func:`mixtune.study_merges.validation_problems`), stored as test scores are, under
        their own :func:`eval_key`; evaluated only when not stored. ``key`` None: not stored."""
        from mixtune import study_merges

        e = self.cfg.eval
        settings = {a: study_merges.validation_settings(e, search, a) for a in self.abilities}
        keys = {a: eval_key(key, settings[a]) for a in self.abilities}
        have = self.stored_validation_scores(key, search) if key is not None else {}
        missing = [a for a in self.abilities if a not in have]
        if missing:
            self.log(f"{run_id}: evaluating {', '.join(missing)} on {search.n} validation problems each")
            records = {a: study_merges.validation_problems(e, search, a) for a in missing}
            got = study_merges.score_validation(model_dir, records, batch_size=e.batch_size, condition=e.condition)
            for a, sc in got.items():
                if key is not None:
                    self._store_score(keys[a], key, settings[a], sc, model_dir, run_id)
                have[a] = sc.score
            self.db.commit()
        return {a: have[a] for a in self.abilities}

    def stored_validation_scores(self, key: str, search) -> dict[str, float]:
        """The validation scores of model ``key`` under ``search`` that are stored (by ability)."""
        from mixtune import study_merges

        out = {}
        for a in self.abilities:
            ek = eval_key(key, study_merges.validation_settings(self.cfg.eval, search, a))
            out |= {a: v for (v,) in self.db.execute(
                "SELECT value FROM evals WHERE eval_key = ? AND metric = 'accuracy'", (ek,))}
        return out

    def store_search(self, run_id: str, rows: list[tuple]) -> None:
        """Replace the search table of ``run_id``: ``(run_id, point, name, params, model_key, scores,
        objective, chosen)`` per grid point (per candidate, for a greedy soup)."""
        self.db.execute("DELETE FROM searches WHERE run_id = ?", (run_id,))
        self.db.executemany("INSERT INTO searches VALUES (?,?,?,?,?,?,?,?)", rows)
        self.db.commit()

    def searches(self) -> list[dict]:
        """Every merge search: ``run`` (its run id), and per point its ``name``, ``params``, ``model_key``,
        validation ``scores`` per ability, ``objective`` and ``chosen``."""
        out: dict[str, list[dict]] = {}
        for run_id, name, params, key, scores, obj, chosen in self.db.execute(
                "SELECT run_id, name, params, model_key, scores, objective, chosen FROM searches "
                "ORDER BY run_id, point"):
            out.setdefault(run_id, []).append({"name": name, "params": json.loads(params), "model_key": key,
                                               "scores": json.loads(scores), "objective": obj, "chosen": bool(chosen)})
        return [{"run": r, "points": p} for r, p in out.items()]

    # -- results ----------------------------------------------------------------------------

    def results(self) -> list[dict]:
        """One row per run x ability x metric under the study's current ``eval`` settings (scores of
        other settings stay in the database, unseen), with the score's standard error (``se``), the
        evaluation settings (``eval_seed``, ``difficulty``, ``condition``, ``eval_key``), the run's
        parameters and seed, its model folder (``model_dir``, relative to the study folder) and its
        readable link (``link``, ``runs/<name>``)."""
        e = self.cfg.eval
        links = self.links()
        rows = []
        for run_id, name, strategy, params, seed, amount, final_key in self.db.execute(
                "SELECT run_id, name, strategy, params, seed, amount, final_key FROM runs ORDER BY rowid").fetchall():
            for ability, ek in sorted(self._eval_keys(final_key).items()):
                for metric, value, se, n, version, hib in self.db.execute(
                        "SELECT metric, value, se, n, version, higher_is_better FROM evals WHERE eval_key = ? "
                        "ORDER BY metric", (ek,)):
                    rows.append({"run_id": run_id, "name": name, "strategy": strategy, "params": params,
                                 "seed": seed, "amount": amount, "ability": ability, "metric": metric,
                                 "value": value, "se": se, "n": n, "version": version, "higher_is_better": hib,
                                 "eval_seed": e.seed, "difficulty": e.difficulty, "condition": e.condition,
                                 "eval_key": ek, "model_dir": self._shown(self.run_folder(final_key)),
                                 "link": f"runs/{links[run_id][0]}"})
        return rows

    def item_scores(self, seed: int | None = None, amount: float | None = None) -> dict[str, dict[str, list[float]]]:
        """``{run name: {ability: per-problem scores}}`` under the study's current ``eval`` settings,
        for the runs of training ``seed`` (default the first) and data ``amount`` (default the full):
        the same problems in the same order for every run, for paired tests
        (:mod:`mixtune.report.paired`). Runs or abilities without stored per-problem scores are absent."""
        seed = min(self.cfg.seeds) if seed is None else seed
        amount = max(self.cfg.amounts) if amount is None else amount
        out: dict[str, dict[str, list[float]]] = {}
        for name, final_key in self.db.execute(
                "SELECT name, final_key FROM runs WHERE seed = ? AND amount = ? ORDER BY rowid", (seed, amount)
                ).fetchall():
            for ability, ek in self._eval_keys(final_key).items():
                scores = [x for (x,) in self.db.execute("SELECT score FROM items WHERE eval_key = ? ORDER BY item",
                                                        (ek,))]
                if scores:
                    out.setdefault(name, {})[ability] = scores
        return out

    def run_folder(self, key: str) -> Path:
        """The folder of the model a run ends with, for its final key ``key``: ``models/<key>``, or the
        starting model itself for a run without stages (the base) that starts from a local folder."""
        if key.startswith("start-") and not self.cfg.model.startswith("builtin:"):
            return Path(self.cfg.model).resolve()
        return self.model_dir(key)

    def _shown(self, folder: Path) -> str:
        """``folder`` relative to the study folder when inside it, else absolute."""
        try:
            return folder.relative_to(self.out).as_posix()
        except ValueError:
            return str(folder.resolve())

    def links(self) -> dict[str, tuple[str, str]]:
        """Per run id in the database: its link name under ``runs/`` (:func:`link_names`) and final model key."""
        runs = self.db.execute("SELECT run_id, name, seed, amount, final_key FROM runs ORDER BY rowid").fetchall()
        names = link_names([(name, seed, amount) for _, name, seed, amount, _ in runs])
        return {run_id: (link, key) for (run_id, *_, key), link in zip(runs, names)}

    def link_runs(self) -> None:
        """Point ``runs/<name>`` at each run's model folder (a relative link, ``../models/<key>``),
        replacing links that point elsewhere and removing links of names no longer in use."""
        folder = self.out / "runs"
        folder.mkdir(exist_ok=True)
        wanted = {}
        for name, key in self.links().values():
            shown = Path(self._shown(self.run_folder(key)))
            wanted[name] = shown if shown.is_absolute() else Path("..") / shown
        for entry in folder.iterdir():
            if entry.is_symlink() and entry.name not in wanted:
                entry.unlink()
        for name, target in wanted.items():
            link = folder / name
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            if link.exists() and not link.is_symlink():  # not ours: leave it
                self.log(f"study: {link} exists and is not a link; not linking run {name} there")
                continue
            tmp = folder / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            try:
                tmp.symlink_to(target, target_is_directory=True)
            except OSError as e:  # a file system without symbolic links: scores.csv still names the folder
                self.log(f"study: no run links in {folder} ({e})")
                return
            os.replace(tmp, link)

    def export_csv(self) -> Path:
        import csv
        import io

        rows = self.results()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["run_id"])
        writer.writeheader()
        writer.writerows(rows)
        return atomic_write_text(self.out / "scores.csv", buf.getvalue())

    def report(self, *, notes: list[str] | None = None, title: str | None = None,
               verdict: list[str] | None = None) -> Path:
        """Write ``report.html`` from the database (loss curves from each run's first seed, full amount).

        ``title`` and ``notes`` default to the study's (:meth:`describe`, from its first invocation);
        the machine, start time and minutes summed over invocations come from its ``meta``.
        ``verdict`` lines are stored, and a later report without them shows the stored ones.
        """
        from mixtune.report import build_report
        from mixtune.study_analysis import Analyses

        meta = self.meta()
        if verdict is not None:
            self._set_meta(verdict=list(verdict))
        else:
            verdict = meta.get("verdict", [])
        title = title or meta.get("title") or "mixtune study"
        notes = list(meta.get("notes", []) if notes is None else notes)
        if "machine" in meta:
            runs = meta.get("invocations", 1)
            notes.append(f"{meta['machine']}; started {meta['started']}; {meta.get('minutes', 0.0):.1f} min in all "
                         f"({runs} invocation{'s' if runs != 1 else ''})")

        curves: dict[str, list[tuple[int, str, str, float]]] = {}
        mixing: dict[str, list[tuple[int, str, str, float]]] = {}
        val_losses: dict[str, dict[str, float]] = {}
        during: dict[str, list[tuple[int, str, str, float]]] = {}
        first_seed, full = min(self.cfg.seeds), max(self.cfg.amounts)
        for name, keys in self.db.execute("SELECT name, stage_keys FROM runs WHERE seed = ? AND amount = ?",
                                          (first_seed, full)):
            points, offset = [], 0
            for key in json.loads(keys):
                row = self.db.execute("SELECT name, steps FROM stages WHERE key = ?", (key,)).fetchone()
                if row is None:
                    continue
                stage, steps = row
                points += [(offset + step, stage, source, loss) for step, source, loss in self.db.execute(
                    "SELECT step, source, loss FROM losses WHERE stage_key = ? ORDER BY step", (key,))]
                mixed = [(offset + step, stage, source, p) for step, source, p in self.db.execute(
                    "SELECT step, source, proportion FROM mixing WHERE stage_key = ? ORDER BY step", (key,))]
                if mixed:
                    mixing.setdefault(name, []).extend(mixed)
                    val_losses[name] = dict(self.db.execute(
                        "SELECT source, loss FROM val_losses WHERE stage_key = ?", (key,)).fetchall())
                during.setdefault(name, []).extend((offset + step, stage, ability, score) for step, ability, score in
                                                   self.db.execute("SELECT step, ability, score FROM train_evals "
                                                                   "WHERE stage_key = ? ORDER BY step", (key,)))
                offset += steps
            if points:
                curves[name] = points
        return build_report(self.results(), curves, self.out / "report.html", title=title, notes=notes,
                            sources=list(self.cfg.sources), mixing=mixing, val_losses=val_losses,
                            abilities=list(self.abilities), verdict=verdict, items=self.item_scores(),
                            during={n: p for n, p in during.items() if p}, searches=self.searches(),
                            analysis=Analyses(self, expand(self.cfg)).report_data())


_WORKER: dict[str, Study] = {}


def open_worker(out_dir: str, base_dir: str) -> None:
    """A ``--jobs`` worker process's start, or a ``--ray`` task's on a process that has not opened
    the study in this run: open the study folder the parent wrote (``study.yaml``)."""
    from mixtune.core import load_config

    study = Study(load_config(StudyConfig, Path(out_dir) / "study.yaml"), Path(out_dir), base_dir=Path(base_dir),
                  progress=False)
    study.graph()
    _WORKER["study"] = study


def run_node(key: str) -> None:
    """Run one node of the study this worker opened (:func:`open_worker`)."""
    _WORKER["study"]._actions[key][0]()
