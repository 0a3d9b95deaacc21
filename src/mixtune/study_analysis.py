"""Analysis nodes in studies: what fine-tuning changed in each run, computed once, stored, reported.

A study's ``analysis`` section names the analyses (:mod:`mixtune.analysis`) to run on its trained
runs, each with its settings; a name left out is not run::

    analysis:
      task_vectors: {}                       # cosines, sign conflicts, mask overlap, norms per block
      intruders: {k: 10, eps: [0.3, 0.5, 0.7, 0.9]}
      conjugate: {transforms: [frame], runs: [sequential, "dmt(k=0.125)"]}
      tuco: {n: 20}
      localize: {sparsity: [0.0001, 0.001, 0.01], n: 50}

Every analysis compares a run's final model with the run's **base**: the model after the study's
``prefix`` stages (the starting model when there is none), the model every run fine-tunes. Runs
without stages of their own (the base itself) are left out, except by ``conjugate``, whose
scores of the base are the reference. Each result is keyed, as stages and scores are, by a hash
of what decides it (the models' keys and the analysis settings), so a rerun computes only what is
missing and a changed setting computes again:

- ``task_vectors``: one node per (seed, amount): :func:`mixtune.analysis.task_vector_table` of the
  runs' final models over their base; ``analysis/task_vectors-<hash>.json``.
- ``intruders``: one node per run: :func:`mixtune.analysis.intruder_table`;
  ``analysis/intruders-<hash>.json``.
- ``conjugate``: one node per run: its abilities scored under each transformed prompt
  (:func:`mixtune.analysis.conjugate_scores`), stored as scores are (``evals/``, with per-problem
  scores, their settings carrying the transform), so the report pairs them with the plain scores.
- ``tuco``: one node per run: the mean TuCo over the first ``n`` test prompts of each ability
  (:func:`mixtune.analysis.tuning_contribution`); ``analysis/tuco-<hash>.json``.
- ``localize``: one node per specialist: accuracy of the graft at each sparsity (the magnitude
  basepatch of :func:`mixtune.analysis.basepatch`, or with ``learn`` the region learned from it,
  :func:`mixtune.analysis.localize_on_records`), and the overlap of the specialists' masks;
  ``analysis/localize-<hash>.json``.

An adapter run (LoRA without ``merge: true``) is analysed in weight space through its merged
model, written once to ``analysis/full/<key>/``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from mixtune.core import ConfigError, Strict, atomic_write_text

if TYPE_CHECKING:
    from mixtune.study import Run, Study


class TaskVectorSettings(Strict):
    """Task-vector geometry of the runs (:func:`mixtune.analysis.task_vector_table`)."""

    density: float = Field(default=0.2, gt=0, le=1)
    """Share of each task vector's entries (per tensor, by magnitude) kept for the sign-conflict rate
    and the mask overlap (TIES' trim; 0.2 as in the TIES paper)."""


class IntruderSettings(Strict):
    """Intruder dimensions per weight matrix (:func:`mixtune.analysis.intruder_table`)."""

    k: int = Field(default=10, ge=1)
    """Top singular vectors of each fine-tuned matrix examined (10, the official code's)."""
    eps: list[float] = Field(default=[0.3, 0.5, 0.7, 0.9], min_length=1)
    """Cosine thresholds: a singular vector is an intruder at eps when its largest |cosine| with every
    pre-trained singular vector is below eps (0.5, the official default, is the headline)."""
    runs: list[str] | None = None
    """Run names to analyse (default: every run with stages of its own)."""
    mitigate: float | None = Field(default=None, ge=0)
    """Also write each run's model with the singular values of its intruders at ``mitigate_eps``
    scaled by this lambda (0.75 in peft's ``reduce_intruder_dimension``) and score it: the
    forgetting before and after (Shuttleworth et al., 2024, Sec. 6). None: no mitigation."""
    mitigate_eps: float = Field(default=0.5, gt=0, le=1)
    """The eps at which the intruders mitigated are found."""


class ConjugateSettings(Strict):
    """Suppressed or erased: the abilities under prompts the later stages never saw (Kotha et al., 2024)."""

    transforms: list[str] = Field(default=["frame"], min_length=1)
    """Built-in transforms (``mixtune list transforms``), templates with ``{prompt}``, or
    ``python:module:function`` (:func:`mixtune.analysis.get_transform`)."""
    runs: list[str] | None = None
    """Run names to score (default: every run, the base included)."""


class TucoSettings(Strict):
    """Tuning contribution per ability (:func:`mixtune.analysis.tuning_contribution`)."""

    n: int = Field(default=20, ge=1)
    """Test prompts per ability (the first ``n`` of the evaluation's problems)."""
    runs: list[str] | None = None
    """Run names to analyse (default: every run with stages of its own)."""


class LocalizeSettings(Strict):
    """Skill localisation by grafting (Panigrahi et al., 2023): how few weights carry each specialist."""

    sparsity: list[float] = Field(default=[0.0001, 0.001, 0.01, 0.1], min_length=1)
    """Shares of the parameters grafted (the top of |tau| over the whole model, the paper's basepatch)."""
    n: int = Field(default=50, ge=1)
    """Test problems per point of the curve (the first ``n`` of the evaluation's)."""
    learn: int = Field(default=0, ge=0)
    """Epochs of the learned region (the official optimisation from each sparsity's basepatch:
    :func:`mixtune.analysis.localize_on_records`, lr 1e7, sigmoid bias 10) on ``learn_n``
    train-split problems of the specialist's built-in ability; 0: the basepatch alone (the
    official ``no_train`` mode)."""
    learn_n: int = Field(default=64, ge=1)
    """Training problems the learned region is fitted on."""


class AnalysisConfig(Strict):
    """Analyses of a study's runs (:mod:`mixtune.study_analysis`); an analysis left out is not run."""

    task_vectors: TaskVectorSettings | None = None
    """Cosines, sign conflicts and mask overlap of the runs' task vectors, and their norms per block."""
    intruders: IntruderSettings | None = None
    """Intruder dimensions of each run's weight matrices (LoRA vs full fine-tuning)."""
    conjugate: ConjugateSettings | None = None
    """Each ability under transformed prompts: suppressed (it returns) or erased (it does not)."""
    tuco: TucoSettings | None = None
    """How much of each prompt's residual stream the fine-tuning contributes."""
    localize: LocalizeSettings | None = None
    """Accuracy of each specialist's sparse graft, and the overlap of the specialists' masks."""

    def methods(self) -> list[str]:
        return [name for name in type(self).model_fields if getattr(self, name) is not None]


METHODS = tuple(AnalysisConfig.model_fields)


def with_methods(cfg: AnalysisConfig, names: list[str]) -> AnalysisConfig:
    """``cfg`` restricted to ``names``, each kept as configured or at its defaults (``mixtune analyze --methods``)."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ConfigError(f"unknown analysis {', '.join(map(repr, unknown))}; choose from {', '.join(METHODS)}")
    return AnalysisConfig(**{n: getattr(cfg, n) or AnalysisConfig.model_fields[n].annotation.__args__[0]()
                             for n in names})


def check_analysis(cfg: AnalysisConfig, names: list[str]) -> list[tuple[tuple, str]]:
    """``(location, message)`` for every name in an analysis' ``runs`` that is not a run of the study."""
    import difflib

    problems = []
    for method in METHODS:
        settings = getattr(cfg, method)
        for i, name in enumerate(getattr(settings, "runs", None) or []):
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                problems.append((("analysis", method, "runs", i), "not a run of this study"
                                 + (f" (did you mean {close[0]!r}?)" if close else f" ({', '.join(names)})")))
    return problems


def _hash(blob: dict) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def base_key(study: Study, run: Run) -> str:
    """The key of the model ``run`` fine-tunes: after the study's prefix (the root when there is none)."""
    from mixtune.study import stage_keys

    n = len(study.cfg.prefix)
    return stage_keys(study.cfg, run)[n - 1] if n else study._root_key(run)


def own_runs(study: Study, runs: list[Run], names: list[str] | None = None) -> list[Run]:
    """The runs with stages after the prefix (``names``: only those of these names)."""
    out = [r for r in runs if len(r.stages) > len(study.cfg.prefix)]
    return _named(out, names)


def _named(out: list[Run], names: list[str] | None) -> list[Run]:
    """The runs of ``out`` named in ``names`` (None: all); the names are checked when the study is read
    (:func:`check_analysis`)."""
    return out if names is None else [r for r in out if r.name in names]


def tuco_prompts(ability: str, n: int, tokenizer, tasks: Mapping, *, seed: int = 0, difficulty: int = 1,
                 condition: str | None = None) -> list[str]:
    """The first ``n`` test prompts of ``ability`` as the model reads them, the prompts TuCo is measured on:
    a task's of ``tasks`` (none for a task that does not generate), else the built-in ability's test
    split at ``seed`` and ``difficulty``, under ``condition``."""
    from mixtune.data.abilities import ABILITIES
    from mixtune.data.format import prompt_text

    if ability in tasks:
        from mixtune.eval.tasks import GenerateTask, load_items, render_prompts

        task = tasks[ability]
        if not isinstance(task, GenerateTask):
            return []
        return render_prompts(task, load_items(task, n), tokenizer)
    records = ABILITIES.get(ability).generate(n, seed=seed, split="test", difficulty=difficulty)
    return [prompt_text(rec["messages"], tokenizer, condition) for rec in records]


def model_folder(study: Study, key: str, run: Run) -> Path:
    """The model ``key`` as a full model folder (:func:`full_model`): the stage's (or its ``merged/``),
    or the starting model for a root key."""
    path = study._start_model(run) if key.startswith("start-") else study.model_path(key)
    return full_model(path, study.out / "analysis" / "full" / key)


def full_model(path: Path, cache: Path) -> Path:
    """``path`` when it is a full model folder; an adapter folder's model merged, written once to ``cache``."""
    path = Path(path)
    if (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        return path
    if not (cache / "config.json").exists():
        from mixtune.core import atomic_dir
        from mixtune.eval import load_for_eval

        model, tokenizer = load_for_eval(path)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        with atomic_dir(cache, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return cache


class Analyses:
    """The analysis nodes of one study: built by :func:`analysis_nodes`, their results read back by
    :meth:`report_data`."""

    def __init__(self, study: Study, runs: list[Run]) -> None:
        self.study, self.runs = study, runs
        self.cfg: AnalysisConfig = study.cfg.analysis
        self.dir = study.out / "analysis"

    # -- nodes ------------------------------------------------------------------------------

    def nodes(self) -> list:
        from mixtune.graph import Node

        out = []
        c = self.cfg
        if c.task_vectors is not None:
            for (seed, amount), group in self._groups().items():
                key = self._task_vector_key(group)
                out.append(self._node(Node(key, "analysis", self._needs(group), f"task vectors, seed {seed}, "
                                           f"amount {amount:g}"), lambda g=group: self._task_vectors(g), key))
        for method, settings in (("intruders", c.intruders), ("tuco", c.tuco)):
            if settings is None:
                continue
            for r in own_runs(self.study, self.runs, settings.runs):
                key = self._run_key(method, r)
                fn = (lambda r=r: self._intruders(r)) if method == "intruders" else (lambda r=r: self._tuco(r))
                out.append(self._node(Node(key, "analysis", self._needs([r]), f"{r.id}: {method}"), fn, key))
        if c.conjugate is not None:
            chosen = _named(list(self.runs), c.conjugate.runs)
            for r in chosen:
                key = "conjugate-" + self.study._final_key(r)
                self.study._actions.setdefault(key, (lambda r=r: self._conjugate(r),
                                                     lambda r=r: not self._missing_conjugate(r)))
                out.append(Node(key, "analysis", self.study.needs(self.study._final_key(r)), f"{r.id}: conjugate"))
        if c.localize is not None:
            for r in self._specialists():
                key = self._run_key("localize", r)
                out.append(self._node(Node(key, "analysis", self._needs([r]), f"{r.id}: localize"),
                                      lambda r=r: self._localize(r), key))
        return out

    def _node(self, node, fn, key: str):
        path = self.dir / f"{key}.json"
        self.study._actions.setdefault(key, (fn, lambda: path.exists()))
        return node

    def _needs(self, runs: list[Run]) -> tuple[str, ...]:
        keys = [self.study._final_key(r) for r in runs] + [base_key(self.study, r) for r in runs]
        return self.study.needs(*dict.fromkeys(keys))

    def _groups(self) -> dict[tuple[int, float], list[Run]]:
        groups: dict[tuple[int, float], list[Run]] = {}
        for r in own_runs(self.study, self.runs):
            groups.setdefault((r.seed, r.amount), []).append(r)
        return {k: v for k, v in groups.items() if v}

    def _specialists(self) -> list[Run]:
        return [r for r in own_runs(self.study, self.runs) if r.name.startswith("specialist:")]

    def _settings(self, method: str) -> dict:
        return getattr(self.cfg, method).model_dump(mode="json", exclude={"runs"})

    def _task_vector_key(self, group: list[Run]) -> str:
        return "task_vectors-" + _hash({"base": base_key(self.study, group[0]), "settings": self._settings(
            "task_vectors"), "models": [self.study._final_key(r) for r in group]})

    def _run_key(self, method: str, r: Run) -> str:
        blob = {"base": base_key(self.study, r), "model": self.study._final_key(r), "settings": self._settings(method)}
        if method in ("tuco", "localize"):  # the prompts come from the evaluation settings
            blob["eval"] = {a: self.study._eval_settings(a) for a in self.study.abilities}
        return f"{method}-" + _hash(blob)

    def _write(self, key: str, what: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / f"{key}.json", json.dumps(what, indent=1))

    def _read(self, key: str) -> dict | None:
        path = self.dir / f"{key}.json"
        return json.loads(path.read_text()) if path.exists() else None

    # -- the analyses -----------------------------------------------------------------------

    def _task_vectors(self, group: list[Run]) -> None:
        from mixtune.analysis import task_vector_table

        s = self.cfg.task_vectors
        base = model_folder(self.study, base_key(self.study, group[0]), group[0])
        self.study.log(f"analysis: task vectors of {len(group)} runs (seed {group[0].seed})")
        table = task_vector_table(base, [model_folder(self.study, self.study._final_key(r), r) for r in group],
                                  density=s.density)
        self._write(self._task_vector_key(group), {"runs": [r.name for r in group], "seed": group[0].seed,
                                                   "amount": group[0].amount, **table})

    def _intruders(self, r: Run) -> None:
        from mixtune.analysis import intruder_table

        s = self.cfg.intruders
        self.study.log(f"{r.id}: intruder dimensions (k = {s.k})")
        rows = intruder_table(model_folder(self.study, base_key(self.study, r), r),
                              model_folder(self.study, self.study._final_key(r), r), k=s.k, eps=tuple(s.eps))
        out = {"run": r.name, "seed": r.seed, "amount": r.amount, "k": s.k, "eps": s.eps, "rows": rows}
        if s.mitigate is not None:
            out["mitigated"] = self._mitigate(r)
        self._write(self._run_key("intruders", r), out)

    def _mitigate(self, r: Run) -> dict:
        """Score run ``r``'s model with its intruders scaled (``intruders.mitigate``), stored as scores
        are under a model key of its own; the plain and mitigated scores per ability, paired."""
        from mixtune.analysis.folders import mitigate_folder
        from mixtune.eval import evaluate, load_for_eval

        s, e = self.cfg.intruders, self.study.cfg.eval
        key = "mitigated-" + _hash({"model": self.study._final_key(r), "base": base_key(self.study, r), "k": s.k,
                                    "eps": s.mitigate_eps, "lambda": s.mitigate})
        folder = self.dir / "mitigated" / key
        changed = mitigate_folder(model_folder(self.study, base_key(self.study, r), r),
                                  model_folder(self.study, self.study._final_key(r), r), folder, k=s.k,
                                  eps=s.mitigate_eps, lam=s.mitigate)
        self.study.log(f"{r.id}: intruders of {changed} matrices scaled by {s.mitigate:g}; evaluating")
        model, tokenizer = load_for_eval(folder)
        got = evaluate(model, tokenizer, list(self.study.abilities), n=e.n, seed=e.seed, difficulty=e.difficulty,
                       batch_size=e.batch_size, condition=e.condition, tasks=self.study.tasks)
        for a, sc in got.items():
            settings = self.study._eval_settings(a)
            self.study._store_score(self._eval_key(key, settings), key, settings, sc, folder, r.id)
        self.study.db.commit()
        return {"model_key": key, "lambda": s.mitigate, "eps": s.mitigate_eps, "matrices": changed}

    def _tuco(self, r: Run) -> None:
        from mixtune.analysis import tuning_contribution
        from mixtune.eval import load_for_eval
        from mixtune.report.paired import standard_error

        s, e = self.cfg.tuco, self.study.cfg.eval
        self.study.log(f"{r.id}: tuning contribution on {s.n} prompts per ability")
        base, _ = load_for_eval(model_folder(self.study, base_key(self.study, r), r))
        tuned, tokenizer = load_for_eval(model_folder(self.study, self.study._final_key(r), r))
        out = {}
        for a in self.study.abilities:
            prompts = tuco_prompts(a, min(s.n, e.n), tokenizer, self.study.tasks, seed=e.seed,
                                   difficulty=e.difficulty, condition=e.condition)
            if prompts:
                values = tuning_contribution(base, tuned, tokenizer, prompts, batch_size=e.batch_size)
                out[a] = {"mean": sum(values) / len(values), "se": standard_error(values), "n": len(values),
                          "values": values}
        self._write(self._run_key("tuco", r), {"run": r.name, "seed": r.seed, "amount": r.amount, "abilities": out})

    def _conjugate_keys(self, r: Run) -> dict[tuple[str, str], tuple[str, dict]]:
        key = self.study._final_key(r)
        out = {}
        for t in self.cfg.conjugate.transforms:
            for a in self._conjugate_abilities(t):
                settings = self.study._eval_settings(a) | {"transform": t}
                out[(t, a)] = (self._eval_key(key, settings), settings)
        return out

    def _conjugate_abilities(self, transform: str) -> list[str]:
        from mixtune.analysis import applies

        return [a for a in self.study.abilities if applies(transform, a, self.study.tasks)]

    @staticmethod
    def _eval_key(key: str, settings: dict) -> str:
        from mixtune.study import eval_key

        return eval_key(key, settings)

    def _missing_conjugate(self, r: Run) -> list[tuple[str, str]]:
        wanted = self._conjugate_keys(r)
        have = {k for (k,) in self.study.db.execute("SELECT eval_key FROM evals")} if wanted else set()
        return [ta for ta, (ek, _) in wanted.items() if ek not in have]

    def _conjugate(self, r: Run) -> None:
        from mixtune.analysis import conjugate_scores
        from mixtune.eval import load_for_eval

        missing = self._missing_conjugate(r)
        if not missing:
            return
        e, key = self.study.cfg.eval, self.study._final_key(r)
        wanted = self._conjugate_keys(r)
        self.study.log(f"{r.id}: scoring {len(missing)} ability x transform pairs under conjugate prompts")
        model_dir = self.study.final_model(r)
        model, tokenizer = load_for_eval(model_dir)
        for t in dict.fromkeys(t for t, _ in missing):
            abilities = [a for tt, a in missing if tt == t]
            got = conjugate_scores(model, tokenizer, abilities, [t], tasks=self.study.tasks, n=e.n, seed=e.seed,
                                   difficulty=e.difficulty, batch_size=e.batch_size)[t]
            for a, sc in got.items():
                ek, settings = wanted[(t, a)]
                self.study._store_score(ek, key, settings, sc, model_dir, r.id)
            self.study.db.commit()

    def _localize(self, r: Run) -> None:
        import torch
        from safetensors.torch import load_file

        from mixtune.analysis import basepatch, graft, localize_on_records
        from mixtune.data.abilities import ABILITIES
        from mixtune.eval import evaluate, load_for_eval

        s, e = self.cfg.localize, self.study.cfg.eval
        source = r.params["order"][0]  # a specialist trains on one source: its built-in ability, or the one of its name
        ability = getattr(self.study.cfg.sources[source], "builtin", None) or source
        abilities = [ability] if ability in self.study.abilities else list(self.study.abilities)
        base_dir = model_folder(self.study, base_key(self.study, r), r)
        tuned_dir = model_folder(self.study, self.study._final_key(r), r)
        base, tuned = _state(base_dir), _state(tuned_dir)
        model, tokenizer = load_for_eval(tuned_dir)
        self.study.log(f"{r.id}: grafting at {len(s.sparsity)} sparsities, {s.n} problems of {', '.join(abilities)}")
        curve = []
        masks_at = {}
        records = None
        if s.learn and ability in ABILITIES and ability not in self.study.tasks:
            records = ABILITIES.get(ability).generate(s.learn_n, seed=0, split="train", difficulty=e.difficulty)
        for sparsity in s.sparsity:
            if records is not None:  # localize leaves the model holding the graft of the region it returns
                model.load_state_dict(load_file(_weights(tuned_dir)), strict=False)
                masks = localize_on_records(model, base, tuned, records, tokenizer, sparsity=sparsity, epochs=s.learn)
            else:
                masks = basepatch(base, tuned, sparsity)
                model.load_state_dict(graft(base, tuned, masks), strict=False)
            masks_at[sparsity] = masks
            got = evaluate(model, tokenizer, abilities, n=min(s.n, e.n), seed=e.seed, difficulty=e.difficulty,
                           batch_size=e.batch_size, condition=e.condition, tasks=self.study.tasks)
            curve.append({"sparsity": sparsity, "kept": int(sum(int(m.sum()) for m in masks.values())),
                          "scores": {a: sc.score for a, sc in got.items()}})
        model.load_state_dict(load_file(_weights(tuned_dir)), strict=False)
        full = evaluate(model, tokenizer, abilities, n=min(s.n, e.n), seed=e.seed, difficulty=e.difficulty,
                        batch_size=e.batch_size, condition=e.condition, tasks=self.study.tasks)
        masks_dir = self.dir / "masks"
        masks_dir.mkdir(parents=True, exist_ok=True)
        from mixtune.analysis import save_masks

        stored = {}
        for sparsity, masks in masks_at.items():
            path = masks_dir / f"{self._run_key('localize', r)}-{sparsity:g}.safetensors"
            save_masks({k: v.to(torch.bool) for k, v in masks.items()}, path)
            stored[f"{sparsity:g}"] = str(path.relative_to(self.study.out))
        self._write(self._run_key("localize", r), {
            "run": r.name, "seed": r.seed, "amount": r.amount, "abilities": abilities, "curve": curve,
            "fine_tuned": {a: sc.score for a, sc in full.items()}, "masks": stored, "learned": records is not None,
            "parameters": int(sum(v.numel() for v in base.values()))})

    # -- read back --------------------------------------------------------------------------

    def report_data(self) -> dict:
        """What the report's "why" section shows, from the stored results (absent ones left out)."""
        from mixtune.report.why import paired_scores

        c, out = self.cfg, {}
        if c.task_vectors is not None:
            tables = [t for g in self._groups().values() if (t := self._read(self._task_vector_key(g)))]
            if tables:
                out["task_vectors"] = tables
        for method in ("intruders", "tuco"):
            settings = getattr(c, method)
            if settings is not None:
                rows = [x for r in own_runs(self.study, self.runs, settings.runs)
                        if (x := self._read(self._run_key(method, r)))]
                for x in rows:
                    if "mitigated" in x:
                        x["mitigated"]["scores"] = self._mitigated_scores(x)
                if rows:
                    out[method] = rows
        if c.localize is not None:
            rows = [x for r in self._specialists() if (x := self._read(self._run_key("localize", r)))]
            if rows:
                out["localize"] = {"rows": rows, "overlap": self._mask_overlap(rows)}
        if c.conjugate is not None:
            rows = []
            for r in _named(list(self.runs), c.conjugate.runs):
                plain = self.study._eval_keys(self.study._final_key(r))
                for (t, a), (ek, _) in self._conjugate_keys(r).items():
                    first, second = self._items(plain.get(a)), self._items(ek)
                    if not first or len(first) != len(second):
                        continue
                    rows.append({"run": r.name, "seed": r.seed, "amount": r.amount, "ability": a, "transform": t,
                                 **paired_scores(first, second)})
            if rows:
                out["conjugate"] = rows
        return out

    def _mitigated_scores(self, row: dict) -> list[dict]:
        """Per ability: the run's plain score, its mitigated model's, and the paired test's p."""
        from mixtune.report.why import paired_scores

        r = next(r for r in self.runs if r.name == row["run"] and r.seed == row["seed"] and r.amount == row["amount"])
        plain = self.study._eval_keys(self.study._final_key(r))
        out = []
        for a in self.study.abilities:
            first = self._items(plain.get(a))
            second = self._items(self._eval_key(row["mitigated"]["model_key"], self.study._eval_settings(a)))
            if first and len(first) == len(second):
                out.append({"ability": a, **paired_scores(first, second, "mitigated")})
        return out

    def _items(self, ek: str | None) -> list[float]:
        if ek is None:
            return []
        return [x for (x,) in self.study.db.execute("SELECT score FROM items WHERE eval_key = ? ORDER BY item", (ek,))]

    def _mask_overlap(self, rows: list[dict]) -> dict:
        """Jaccard overlap of the specialists' masks at each sparsity (same seed and amount as the first)."""
        from mixtune.analysis import load_masks, mask_overlap

        rows = [x for x in rows if x["seed"] == rows[0]["seed"] and x["amount"] == rows[0]["amount"]]
        out = {"runs": [x["run"] for x in rows], "jaccard": {}}
        for sparsity in rows[0]["masks"]:
            masks = [load_masks(self.study.out / x["masks"][sparsity]) for x in rows if sparsity in x["masks"]]
            if len(masks) == len(rows):
                out["jaccard"][sparsity] = [[mask_overlap(a, b) for b in masks] for a in masks]
        return out


def _weights(folder: Path) -> Path:
    path = Path(folder) / "model.safetensors"
    if not path.exists():
        raise ConfigError(f"{folder}: skill localisation needs one model.safetensors file (a sharded model: "
                          "use a smaller model, it holds the whole model in memory)")
    return path


def _state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(_weights(folder)).items() if v.is_floating_point()}


def analysis_nodes(study: Study, runs: list[Run]) -> list:
    """The study's analysis nodes (none without an ``analysis`` section), after everything they read."""
    return Analyses(study, runs).nodes()
