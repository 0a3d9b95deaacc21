"""Studies: a grid of runs, each stage prefix trained once, scores in SQLite, resumable.

A study lists strategies (list-valued parameters expand: ``k: [0, 0.125]``), optional one-source
specialists, seeds and data amounts. Every run is a list of stages (the study's ``prefix``
stages, then the strategy's). A stage is identified by a hash of everything that decides its
weights: the model, seed, amount, sources, format and training settings, and the stage configs
up to and including it. Runs that share a prefix (mixed-sequential and every DMT k share stage 1;
a specialist and sequential training share their first stage) train it once.

Layout of ``DIR``::

    results.sqlite   stages, runs, scores (one row per model x ability x metric), losses
    scores.csv       one row per run x ability x metric, with the run's parameters and seed
    models/<key>/    the model after each trained stage
    work/<key>/      a stage being trained (checkpoints; resumed if interrupted)
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, TypeAdapter

from mixtune.core import ConfigError, Strict, atomic_write_text, dump_config
from mixtune.data.format import FormatConfig
from mixtune.data.sources import SourceConfig
from mixtune.recipe import Recipe
from mixtune.strategy import StageConfig, StrategyConfig, plan_stages
from mixtune.train.config import TrainConfig
from mixtune.train.methods import MethodConfig


class EvalConfig(Strict):
    """What every model in a study is scored on."""

    abilities: list[str] = ["math", "code", "general"]
    """Built-in abilities, scored on their held-out test split."""
    n: int = Field(default=200, ge=1)
    """Problems per ability."""
    difficulty: int = Field(default=1, ge=1, le=3)
    seed: int = 0
    """Which held-out problems (the same for every model)."""
    batch_size: int = Field(default=64, ge=1)
    condition: str | None = None
    """C-RLFT inference condition: the class tag every prompt carries (e.g. the expert source's)."""


class StudyConfig(Strict):
    """A study recipe."""

    model: str = "builtin:tiny"
    """Starting model, as in a training recipe."""
    sources: dict[str, SourceConfig] = Field(min_length=1)
    format: FormatConfig = FormatConfig()
    train: TrainConfig = TrainConfig()
    prefix: list[StageConfig] = []
    """Stages every run starts with (e.g. format pretraining); the model after them is the base."""
    specialists: list[str] = []
    """Sources to train alone, one run each (the specialists forgetting is measured against)."""
    strategies: list[dict] = []
    """Strategy configs; a list-valued parameter gives one run per value, e.g. ``{name: dmt, k: [0, 0.125]}``."""
    methods: list[MethodConfig] = []
    """Tuning methods to compare: every run but the base is repeated once per method (its stages
    after the prefix train with it; the prefix trains with ``train.method``). Empty: ``train.method``
    only. Adapter methods export their merged model too, which the next stage starts from."""
    method_lr: dict[str, float] = {}
    """Peak learning rate per method name in ``methods`` (default ``train.lr``): adapters and sparse
    methods usually want a larger one than full fine-tuning."""
    seeds: list[int] = [0]
    amounts: list[float] = [1.0]
    """Share of every non-prefix source to use (data-scaling curves when several)."""
    eval: EvalConfig = EvalConfig()


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
        listed = {k: v for k, v in spec.items() if isinstance(v, list) and k != "order"}
        for combo in itertools.product(*listed.values()) if listed else [()]:
            params = spec | dict(zip(listed, combo))
            strategy = _strategy(params)
            label = ",".join(f"{k}={_compact(v)}" for k, v in params.items() if k != "name" and k in listed)
            name = f"{params['name']}({label})" if label else params["name"]
            variants.append((name, params["name"], {k: v for k, v in params.items() if k != "name"},
                             plan_stages(strategy, sources)))
    methods = [m.model_dump(mode="json") for m in study.methods] or [None]
    return [Run(name if method is None or not stages else f"{name} [{method_label(method)}]", strat, params, seed,
                amount, [*study.prefix, *stages], method if stages else None)
            for seed in study.seeds for amount in study.amounts for method in methods
            for name, strat, params, stages in variants if stages or method == methods[0]]


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
              "format": study.format.model_dump(mode="json"), "train": study.train.model_dump(mode="json"),
              "prefix_len": len(study.prefix)}
    keys, chain = [], []
    own = run_method(study, run)
    for i, st in enumerate(run.stages):
        entry = st.model_dump(mode="json", exclude={"name"})
        if own is not None and i >= len(study.prefix):
            entry |= own
        chain.append(entry)
        blob = json.dumps(common | {"stages": chain}, sort_keys=True)
        keys.append(hashlib.sha256(blob.encode()).hexdigest()[:16])
    return keys


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
CREATE TABLE IF NOT EXISTS scores (model_key TEXT, ability TEXT, metric TEXT, value REAL, n INTEGER,
    version INTEGER, higher_is_better INTEGER, PRIMARY KEY (model_key, ability, metric));
CREATE TABLE IF NOT EXISTS losses (stage_key TEXT, step INTEGER, source TEXT, loss REAL);
CREATE TABLE IF NOT EXISTS mixing (stage_key TEXT, step INTEGER, source TEXT, proportion REAL);
CREATE TABLE IF NOT EXISTS val_losses (stage_key TEXT, source TEXT, loss REAL, PRIMARY KEY (stage_key, source));
"""


class Study:
    """A study folder and its results database."""

    def __init__(self, cfg: StudyConfig, out_dir: Path, *, base_dir: Path = Path("."), progress: bool = True,
                 log=print) -> None:
        self.cfg, self.out, self.base_dir, self.progress, self.log = cfg, Path(out_dir), base_dir, progress, log
        self.out.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.out / "results.sqlite")
        self.db.executescript(SCHEMA)
        have = {row[1] for row in self.db.execute("PRAGMA table_info(stages)")}
        for column, kind in [("trainable", "INTEGER"), ("optimizer_bytes", "INTEGER"), ("peak_rss_mb", "REAL")]:
            if column not in have:  # a study folder from before these were recorded
                self.db.execute(f"ALTER TABLE stages ADD COLUMN {column} {kind}")
        atomic_write_text(self.out / "study.yaml", dump_config(cfg))

    def run(self, on_stage=None) -> None:
        """Train what is missing, evaluate what is unscored, export ``scores.csv``."""
        runs = expand(self.cfg)
        for r in runs:
            keys = stage_keys(self.cfg, r)
            self.db.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?)",
                            (r.id, r.name, r.strategy, json.dumps(r.params), r.seed, r.amount, json.dumps(keys),
                             self._final_key(r)))
        self.db.commit()
        distinct = {k for r in runs for k in stage_keys(self.cfg, r)}
        todo = sum(1 for k in distinct if not self._trained(k))
        self.log(f"study: {len(runs)} runs, {len(distinct)} distinct stages ({todo} to train)")
        for r in runs:
            self._train_run(r, on_stage)
        for r in runs:
            self._evaluate(self._final_key(r), r)
        self.export_csv()

    # -- training ---------------------------------------------------------------------------

    def _root_key(self, run: Run) -> str:
        return "start-" + hashlib.sha256(f"{self.cfg.model}|{run.seed}".encode()).hexdigest()[:10]

    def model_dir(self, key: str) -> Path:
        return self.out / "models" / key

    def _trained(self, key: str) -> bool:
        return (self.model_dir(key) / "mixtune.yaml").exists()

    def model_path(self, key: str) -> Path:
        """The full model after stage ``key``: the stage folder, or its ``merged/`` for adapter methods."""
        merged = self.model_dir(key) / "merged"
        return merged if (merged / "config.json").exists() else self.model_dir(key)

    def _train_config(self, run: Run, stage: int) -> TrainConfig:
        """The study's training settings, with the run's method after the prefix (adapters also merged)."""
        own = run_method(self.cfg, run)
        if own is None or stage < len(self.cfg.prefix):
            return self.cfg.train
        method = TypeAdapter(MethodConfig).validate_python(own["method"])
        if "merge" in type(method).model_fields:
            method = method.model_copy(update={"merge": True})  # the next stage and the evaluation need a full model
        return self.cfg.train.model_copy(update={"method": method, "lr": own["lr"]})

    def _start_model(self, run: Run) -> Path:
        from mixtune.pipeline import start_model

        return start_model(self.cfg.model, seed=run.seed, folder=self.model_dir(self._root_key(run)))

    def _final_key(self, run: Run) -> str:
        """The key of the model a run ends with (its starting model when it has no stages)."""
        keys = stage_keys(self.cfg, run)
        return keys[-1] if keys else self._root_key(run)

    def _recipe(self, run: Run) -> Recipe:
        return Recipe(seed=run.seed, model=self.cfg.model, sources=self.cfg.sources, format=self.cfg.format,
                      stages=run.stages or None, train=self.cfg.train)

    def _train_run(self, run: Run, on_stage) -> None:
        from mixtune.models import load_model, load_tokenizer
        from mixtune.pipeline import prepare_data, stage_plan
        from mixtune.train.loop import train

        keys = stage_keys(self.cfg, run)
        if all(self._trained(k) for k in keys):
            return
        parent = self._start_model(run)
        tokenizer = load_tokenizer(parent)
        recipe = self._recipe(run)
        data = prepare_data(recipe, self.base_dir, tokenizer=tokenizer, select_with=parent,
                            amount=run.amount,
                            amount_skip={s for st in self.cfg.prefix for s in st.mixture.sources})
        plans = stage_plan(recipe, data)
        prev = None
        for i, (key, plan) in enumerate(zip(keys, plans)):
            if self._trained(key):
                prev = key
                continue
            self.log(f"{run.id}: training stage {i + 1}/{len(keys)} {plan.name} ({plan.steps} steps) -> {key}")
            src = self.model_path(prev) if prev else parent
            model, tokenizer = load_model(src)
            t0 = time.perf_counter()
            work = self.out / "work" / key
            reset_peak_rss()
            train_cfg = self._train_config(run, i)
            if run.stages[i].lr is None:  # a method's own learning rate (method_lr), unless the stage sets one
                plan = dataclasses.replace(plan, lr=train_cfg.lr)
            (exported,) = train(model, tokenizer, [plan], train_cfg, work,
                                source_names=data.source_names, seed=run.seed, config_text=dump_config(recipe),
                                progress=self.progress, first_stage=i)
            seconds, peak = time.perf_counter() - t0, peak_rss_mb()
            dest = self.model_dir(key)
            shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            exported.rename(dest)
            sizes = self._store_log(key, work / "log.jsonl")
            self.db.execute("INSERT OR REPLACE INTO stages VALUES (?,?,?,?,?,?,?,?)",
                            (key, prev, plan.name, plan.steps, seconds, sizes.get("trainable_params"),
                             sizes.get("optimizer_bytes"), peak))
            self.db.commit()
            shutil.copy2(work / "log.jsonl", dest / "train_log.jsonl")  # the stage's full log stays with its model
            shutil.rmtree(work, ignore_errors=True)
            prev = key
            if on_stage is not None:
                on_stage(key)

    def _store_log(self, key: str, log_path: Path) -> dict:
        """Store a stage's training loss per source, and for mixed stages the proportions and
        validation losses; returns its size entry (trainable parameters, optimizer bytes)."""
        for table in ("losses", "mixing", "val_losses"):
            self.db.execute(f"DELETE FROM {table} WHERE stage_key = ?", (key,))
        rows, mix, val, sizes = [], [], [], {}
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
        self.db.executemany("INSERT INTO losses VALUES (?,?,?,?)", rows)
        self.db.executemany("INSERT INTO mixing VALUES (?,?,?,?)", mix)
        self.db.executemany("INSERT OR REPLACE INTO val_losses VALUES (?,?,?)", val)
        return sizes

    # -- evaluation -------------------------------------------------------------------------

    def _evaluate(self, key: str, run: Run) -> None:
        from mixtune.eval import evaluate, write_results
        from mixtune.models import load_model

        e = self.cfg.eval
        have = {a for (a,) in self.db.execute("SELECT ability FROM scores WHERE model_key = ?", (key,))}
        missing = [a for a in e.abilities if a not in have]
        if not missing:
            return
        self.log(f"{run.id}: evaluating {', '.join(missing)} on {e.n} held-out problems each")
        model_dir = self.model_path(key) if (self.model_path(key) / "config.json").exists() else self._start_model(run)
        model, tokenizer = load_model(model_dir)
        scores = evaluate(model, tokenizer, missing, n=e.n, seed=e.seed, difficulty=e.difficulty,
                          batch_size=e.batch_size, condition=e.condition)
        write_results(scores, self.out / "evals" / key, {"model": str(model_dir), "run": run.id})
        self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?,?,?,?,?,?,?)", [
            (key, a, "accuracy", s.score, s.n, s.version, int(s.higher_is_better)) for a, s in scores.items()])
        self.db.commit()

    # -- results ----------------------------------------------------------------------------

    def results(self) -> list[dict]:
        """One row per run x ability x metric, with the run's parameters and seed."""
        cur = self.db.execute(
            "SELECT r.run_id, r.name, r.strategy, r.params, r.seed, r.amount, s.ability, s.metric, s.value, s.n, "
            "s.version, s.higher_is_better FROM runs r JOIN scores s ON s.model_key = r.final_key "
            "ORDER BY r.rowid, s.ability")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur]

    def export_csv(self) -> Path:
        import csv
        import io

        rows = self.results()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["run_id"])
        writer.writeheader()
        writer.writerows(rows)
        return atomic_write_text(self.out / "scores.csv", buf.getvalue())

    def report(self, *, notes: list[str] = (), title: str = "mixtune study") -> Path:
        """Write ``report.html`` from the database (loss curves from each run's first seed, full amount)."""
        from mixtune.report import build_report

        curves: dict[str, list[tuple[int, str, str, float]]] = {}
        mixing: dict[str, list[tuple[int, str, str, float]]] = {}
        val_losses: dict[str, dict[str, float]] = {}
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
                offset += steps
            if points:
                curves[name] = points
        return build_report(self.results(), curves, self.out / "report.html", title=title, notes=list(notes),
                            sources=list(self.cfg.sources), mixing=mixing, val_losses=val_losses)
