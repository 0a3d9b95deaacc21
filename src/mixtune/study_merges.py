"""Merge nodes of a study: merged models of its trained runs, scored and reported beside them.

A study's ``merges`` list names the runs to merge and the method, as ``mixtune merge`` does::

    merges:
      - method: ties_paper
        of: [specialist:math, specialist:code]      # runs of the study, by the names it gives them
        grid: {density: [0.2, 0.5], lambda: [1.0]}  # one merged model per point
        search: {n: 50}                             # pick the point on validation problems

``base`` (default the study's ``base`` run: the starting model after the prefix) is the model the
task vectors are taken from, for methods that need one. A grid point is one merge, keyed by a hash
of the method, its parameters and the keys of its input models (:func:`merge_key`), written by
:func:`mixtune.merge.run.merge` (what ``mixtune merge`` runs) to ``models/<key>/`` and evaluated
as the trained runs are; a finished merge is never redone.

With ``search``, every point is scored on a validation sample of each ability instead
(:func:`validation_problems`: held-out problems drawn from a stream of their own, never one of the
study's test problems), the point with the best (weighted) mean is chosen, and only that one is
scored on the test problems, under the entry's name; the report's search table shows every
point's validation scores and the choice. ``method: greedy_soup`` (Wortsman et al., 2022) needs
``search``: its held-out score is the same validation mean.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from mixtune.core import Strict
from mixtune.data.abilities import ABILITIES
from mixtune.data.abilities.base import to_record

if TYPE_CHECKING:
    from mixtune.study import EvalConfig, Run, Study, StudyConfig

GREEDY_SOUP = "greedy_soup"
"""The merge entry method that runs :func:`mixtune.merge.soup.greedy_soup` on the validation sample."""


class MergeSearch(Strict):
    """How a merge entry's grid point is chosen: on validation problems, never the test ones."""

    n: int = Field(default=50, ge=1)
    """Validation problems per ability (held-out problems other than the study's test problems)."""
    seed: int = 0
    """Which validation problems."""
    weights: dict[str, float] = {}
    """Weight of an ability in the mean that picks the point (default 1 each), e.g. ``{math: 2}``."""


class MergeEntry(Strict):
    """Merged models of a study's runs: one per point of ``grid``, or the point ``search`` picks."""

    method: str
    """A merge method (``mixtune merge --list``: ties_paper, lines, task_arithmetic, pcb, ...) or
    ``greedy_soup``."""
    of: list[str] = Field(min_length=1)
    """The runs whose models are merged, by the names the study gives them (``specialist:math``,
    ``dmt(k=0.125)``, ``multi_task [lora(r=4)]``, ``base``); the same seed and amount as the merge."""
    base: str = "base"
    """The run whose model the task vectors are taken from (methods that need a base): by default
    the study's base run, its starting model after the prefix."""
    weights: list[float] = []
    """Weight of each model of ``of`` (default 1 each)."""
    parameters: dict = {}
    """Method parameters (``mixtune merge --list``); a per-model parameter (mergekit's ``density``)
    applies to every model."""
    grid: dict[str, list] = {}
    """Parameters to vary: one merge per combination, e.g. ``{density: [0.1, 0.2], lambda: [0.5, 1.0]}``."""
    dtype: str | None = None
    """float32, bfloat16 or float16 for the merged weights (default: as the base stores them)."""
    seed: int = 0
    """Seed of random methods (DARE)."""
    name: str | None = None
    """The run name in scores and reports (default: the method); a grid point without ``search``
    adds its parameters, ``ties_paper(density=0.2,lambda=1)``."""
    search: MergeSearch | None = None
    """Choose the grid point with the best mean score on validation problems and score only it on
    the test problems (default: score every point on the test problems)."""

    @model_validator(mode="after")
    def _check(self) -> MergeEntry:
        from mixtune.merge.io import DTYPES

        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.weights and len(self.weights) != len(self.of):
            raise ValueError(f"weights has {len(self.weights)} values for the {len(self.of)} models of `of`")
        if self.method == GREEDY_SOUP:
            given = [k for k in ("grid", "parameters", "weights") if getattr(self, k)]
            if given:
                raise ValueError(f"greedy_soup takes no {' or '.join(given)}: it averages the models it keeps")
            if self.search is None:
                raise ValueError("greedy_soup needs `search` (e.g. search: {n: 50}): it keeps a model only when the "
                                 "average scores higher on validation problems")
            return self
        method = _method(self.method)
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid.{key}: give a non-empty list of values, e.g. [0.2, 0.5]")
            if key in self.parameters:
                raise ValueError(f"{key} is in both `parameters` and `grid`; give it once")
        for point in self.points():
            split_parameters(method, point, self.method)
        if self.search is not None and not self.grid:
            raise ValueError("search needs a `grid` to choose from")
        return self

    def points(self) -> list[dict]:
        """Every parameter combination: ``parameters`` with one value of each ``grid`` key."""
        return [self.parameters | dict(zip(self.grid, combo)) for combo in itertools.product(*self.grid.values())]

    def label(self, point: dict) -> str:
        """The run name of a grid point: ``name(density=0.2,lambda=1)`` (the grid's keys only)."""
        from mixtune.study import _compact

        inner = ",".join(f"{k}={_compact(point[k])}" for k in self.grid)
        return f"{self.run_name}({inner})" if inner else self.run_name

    @property
    def run_name(self) -> str:
        return self.name or self.method


def _method(name: str):
    from mixtune.core import MixtuneError
    from mixtune.merge import MERGE_METHODS

    try:
        return MERGE_METHODS.get(name)
    except MixtuneError as e:  # unknown: pydantic reports it at the entry's line
        raise ValueError(f"{e} (or {GREEDY_SOUP})") from None


def needs_base(m: MergeEntry) -> bool:
    """Whether the entry's method takes a base model (greedy_soup averages the models alone)."""
    return m.method != GREEDY_SOUP and _method(m.method).needs_base


def split_parameters(method, point: dict, name: str) -> tuple:
    """``point``'s method parameters and per-model parameters, validated; raises ValueError naming the key."""
    from mixtune.merge.run import _explain

    own = {f.alias or k for k, f in method.params.model_fields.items()} | set(method.params.model_fields)
    glob = {k: v for k, v in point.items() if k in own or k not in method.model_params.model_fields}
    per = {k: v for k, v in point.items() if k not in glob}
    try:
        return method.params.model_validate(glob), method.model_params.model_validate(per)
    except Exception as e:
        raise ValueError(f"parameters {point} for {name}: {_explain(e)}") from None


def check_merges(cfg: StudyConfig, run_names: list[str]) -> list[tuple[tuple, str]]:
    """Problems of ``cfg.merges`` that need the whole study, as ``(location, message)``: names in
    ``of`` and ``base`` that are not runs, run names taken twice, searches over task files."""
    problems = []
    known = list(dict.fromkeys(run_names))
    taken: dict[str, str] = {n: "a run of the study" for n in known}
    files = [a for a in cfg.eval.abilities if a.endswith((".yaml", ".yml"))]
    for i, m in enumerate(cfg.merges):
        names = [(("of", j), n) for j, n in enumerate(m.of)]
        if needs_base(m):
            names.append((("base",), m.base))
        for where, n in names:
            if n not in known:
                close = difflib.get_close_matches(n, known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                problems.append((("merges", i, *where), f"not a run of this study ({hint}runs: {', '.join(known)})"))
        for n in [m.run_name] if m.search or m.method == GREEDY_SOUP else [m.label(p) for p in m.points()]:
            if n in taken:
                problems.append((("merges", i, "name"), f"run name {n!r} is taken by {taken[n]}; give this entry a "
                                                        "`name`"))
            taken[n] = f"merges[{i}]"
        if m.search is not None:
            if files:
                problems.append((("merges", i, "search"), f"eval.abilities has task file {files[0]}: search draws "
                                 "validation problems apart from the test ones only for built-in abilities; score every "
                                 "grid point on the test problems instead (leave out search)"))
            unknown = [a for a in m.search.weights if a not in cfg.eval.abilities]
            if unknown:
                problems.append((("merges", i, "search", "weights"), f"names {', '.join(unknown)}, not one of "
                                 f"eval.abilities ({', '.join(cfg.eval.abilities)})"))
    return problems


@dataclass(frozen=True)
class MergeRun:
    """One merged model: an entry's grid point for one seed and amount of the study."""

    name: str
    entry: int
    point: int
    parameters: dict
    inputs: tuple
    """The runs merged (:class:`mixtune.study.Run`), in ``of`` order."""
    base: object | None
    """The base run, for methods that need one."""
    seed: int
    amount: float

    @property
    def id(self) -> str:
        return f"{self.name}|seed={self.seed}|amount={self.amount:g}"


def expand_merges(cfg: StudyConfig, runs: list[Run]) -> list[MergeRun]:
    """Every merge of the study: per entry, seed and amount, one per grid point (one for greedy_soup)."""
    by_name = {(r.name, r.seed, r.amount): r for r in runs}
    out = []
    for seed in cfg.seeds:
        for amount in cfg.amounts:
            for i, m in enumerate(cfg.merges):
                inputs = tuple(by_name[(n, seed, amount)] for n in m.of)
                base = by_name[(m.base, seed, amount)] if needs_base(m) else None
                points = [{}] if m.method == GREEDY_SOUP else m.points()
                out += [MergeRun(m.label(p) if m.method != GREEDY_SOUP else m.run_name, i, j, p, inputs, base, seed,
                                 amount) for j, p in enumerate(points)]
    return out


def merge_key(study: Study, mr: MergeRun) -> str:
    """A hash of everything that decides the merged weights: the method, its validated parameters,
    the weights, dtype and seed, and the keys of the base and the input models (for greedy_soup,
    the validation problems that choose its ingredients, instead of parameters)."""
    m = study.cfg.merges[mr.entry]
    what = {"method": m.method, "models": [study._final_key(r) for r in mr.inputs],
            "base": study._final_key(mr.base) if mr.base is not None else None, "dtype": m.dtype}
    if m.method == GREEDY_SOUP:
        from mixtune.study import eval_key

        what["validation"] = {a: eval_key(None, validation_settings(study.cfg.eval, m.search, a))
                              for a in study.abilities}
        what["weights"] = m.search.weights
    else:
        params, per_model = split_parameters(_method(m.method), mr.parameters, m.method)
        what |= {"parameters": params.model_dump(mode="json", by_alias=True),
                 "model_parameters": per_model.model_dump(mode="json", by_alias=True),
                 "weights": m.weights or [1.0] * len(m.of), "seed": m.seed}
    blob = json.dumps(what, sort_keys=True)
    return "merge-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def merge_config(study: Study, mr: MergeRun):
    """The :class:`~mixtune.merge.config.MergeConfig` of a grid point, on the study's model folders."""
    from mixtune.merge import MergeConfig

    m = study.cfg.merges[mr.entry]
    method = _method(m.method)
    params, per_model = split_parameters(method, mr.parameters, m.method)
    per = per_model.model_dump(mode="json", by_alias=True, exclude_unset=True)
    models = [{"model": study.final_model(r).resolve(), "weight": w, "parameters": per}
              for r, w in zip(mr.inputs, m.weights or [1.0] * len(mr.inputs))]
    base = study.final_model(mr.base).resolve() if mr.base is not None else None
    return MergeConfig(method=m.method, base_model=base, models=models, dtype=m.dtype, seed=m.seed,
                       parameters=params.model_dump(mode="json", by_alias=True, exclude_unset=True))


# -- validation ---------------------------------------------------------------------------------


def validation_settings(e: EvalConfig, search: MergeSearch, ability: str) -> dict:
    """The evaluation settings of a validation score: the study's, with the validation sample's
    ``n`` and ``seed``, and the test problems it is kept apart from."""
    from mixtune.study import study_eval_settings

    return study_eval_settings(e, ability) | {"split": "validation", "n": search.n, "seed": search.seed,
                                              "apart_from": {"n": e.n, "seed": e.seed}}


def validation_problems(e: EvalConfig, search: MergeSearch, ability: str) -> list[dict]:
    """``search.n`` held-out problems of a built-in ability, none of them one of the study's test
    problems: the test split drawn from a random stream of its own (``validation``), skipping every
    problem whose structure key is one of the ``e.n`` test problems of ``e.seed``."""
    impl = ABILITIES.get(ability)
    test = {p.key for p in impl.problems(e.n, seed=e.seed, split="test", difficulty=e.difficulty)}
    drawn = impl.problems(search.n, seed=search.seed, split="test", difficulty=e.difficulty, stream="validation",
                          exclude=test)
    return [to_record(ability, p, impl.instruction) for p in drawn]


def score_validation(model_dir: Path, records: dict[str, list[dict]], *, batch_size: int,
                     condition: str | None) -> dict:
    """Per ability, the :class:`~mixtune.eval.AbilityScore` of the model in ``model_dir`` on its
    validation ``records``, greedy, prompted and budgeted as :func:`mixtune.eval.evaluate` does."""
    from mixtune.eval import load_for_eval
    from mixtune.eval.run import score_records

    model, tokenizer = load_for_eval(model_dir)
    return {name: score_records(model, tokenizer, name, recs, batch_size=batch_size, condition=condition)
            for name, recs in records.items()}


def objective(scores: dict[str, float], weights: dict[str, float], higher: dict[str, bool]) -> float:
    """The weighted mean that picks a grid point: sum_a w_a s_a / sum_a w_a (w_a default 1; a
    lower-is-better score counts negated)."""
    w = {a: weights.get(a, 1.0) for a in scores}
    return sum(w[a] * (s if higher.get(a, True) else -s) for a, s in scores.items()) / sum(w.values())


# -- running ------------------------------------------------------------------------------------


def merge_nodes(study: Study, runs: list[Run]) -> list:
    """The study graph's merge nodes: per grid point a ``merge`` node (needing the models it merges)
    and its evaluation; for an entry with a ``search``, a ``search`` node that scores every point on
    validation problems and records the choice, then the evaluation of the chosen point only; a
    greedy soup is one node (it scores its candidates on validation problems as it goes). Registers
    each node's action in ``study._actions`` and the runs known before anything runs in
    ``study._records``."""
    from mixtune.graph import Node

    cfg, nodes = study.cfg, []
    groups: dict[tuple, list[MergeRun]] = {}
    for mr in expand_merges(cfg, runs):
        groups.setdefault((mr.entry, mr.seed, mr.amount), []).append(mr)
    for (entry, *_), points in groups.items():
        m = cfg.merges[entry]
        keys = [merge_key(study, mr) for mr in points]
        for mr, key in zip(points, keys):
            inputs = study.needs(*(study._final_key(r) for r in (*mr.inputs, *([mr.base] if mr.base else []))))
            act = (lambda mr=mr, key=key: _soup(study, mr, key)) if m.method == GREEDY_SOUP else (
                lambda mr=mr, key=key: _merge(study, mr, key))
            study._actions.setdefault(key, (act, lambda key=key: study.merged(key)))
            nodes.append(Node(key, "merge", inputs, f"{mr.id}: merge"))
            if m.search is None or m.method == GREEDY_SOUP:
                study._records.append((mr.id, mr.name, "merge", _params(m, mr, key), mr.seed, mr.amount, key))
                nodes.append(study.eval_node(key, mr))
        if m.search is None or m.method == GREEDY_SOUP:
            continue
        run_id = f"{m.run_name}|seed={points[0].seed}|amount={points[0].amount:g}"
        search_key = "search-" + hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]

        chosen_key = functools.partial(current_choice, study, m, run_id, keys)

        def search(m=m, run_id=run_id, points=points, keys=keys) -> None:
            chosen = _search(study, m, run_id, points, keys)
            mr = dataclasses.replace(points[chosen], name=m.run_name)  # scored under the entry's name
            study.record_run(mr.id, mr.name, "merge", _params(m, mr, keys[chosen]) | {"searched": True}, mr.seed,
                             mr.amount, keys[chosen])

        study._actions.setdefault(search_key, (search, lambda f=chosen_key: f() is not None))
        nodes.append(Node(search_key, "search", tuple(keys), f"{run_id}: search"))
        nodes.append(study.eval_node(None, dataclasses.replace(points[0], name=m.run_name), node_key="eval-" + search_key,
                                     needs=(search_key,), model_key=chosen_key))
    return nodes


def current_choice(study: Study, m: MergeEntry, run_id: str, keys: list[str]) -> str | None:
    """The grid point (its merge key) the stored search of ``run_id`` chose, when it is still the
    choice: the stored search has exactly the points ``keys``, each has its validation scores under
    the current ``search`` settings, and the current ``weights`` pick the recorded one from them.
    None otherwise (the search node runs again, from the stored scores)."""
    rows = study.db.execute("SELECT model_key, chosen FROM searches WHERE run_id = ? ORDER BY point",
                            (run_id,)).fetchall()
    recorded = study.db.execute("SELECT final_key FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if [k for k, _ in rows] != list(keys) or recorded is None:
        return None
    scored = []
    for key in keys:
        scores = study.stored_validation_scores(key, m.search)
        if set(scores) != set(study.abilities):
            return None
        scored.append(objective(scores, m.search.weights, _higher(scores)))
    best = keys[choose(scored)]
    return best if [k for k, c in rows if c] == [best] == [recorded[0]] else None


def _params(m: MergeEntry, mr: MergeRun, key: str) -> dict:
    """The ``params`` column of a merge run: its method, inputs, base and parameters."""
    return {"method": m.method, "of": list(m.of), "base": m.base if mr.base is not None else None,
            "parameters": mr.parameters}


def _merge(study: Study, mr: MergeRun, key: str) -> None:
    from mixtune.merge.run import merge

    dest = study.model_dir(key)
    study.log(f"{mr.id}: merging {', '.join(r.name for r in mr.inputs)} ({study.cfg.merges[mr.entry].method}) "
              f"-> {key}")
    merge(merge_config(study, mr), dest, overwrite=dest.exists(), notice=study.log)


def _soup(study: Study, mr: MergeRun, key: str) -> None:
    from mixtune.merge.soup import greedy_soup

    m = study.cfg.merges[mr.entry]
    folders = {str(study.final_model(r).resolve()): r for r in mr.inputs}
    study.log(f"{mr.id}: greedy soup of {', '.join(r.name for r in mr.inputs)} on validation problems -> {key}")
    own: dict[str, dict[str, float]] = {}

    def score(folder: Path) -> float:
        run = folders.get(str(Path(folder).resolve()))  # a candidate's scores are kept; a trial soup's are not
        scores = study.validation_scores(study._final_key(run) if run else None, Path(folder), mr.id, m.search)
        own.setdefault(str(folder), scores)
        return objective(scores, m.search.weights, _higher(scores))

    result = greedy_soup(list(folders), score, study.model_dir(key), dtype=m.dtype, overwrite=True,
                         progress=study.log)
    # the search table: each candidate's validation scores, chosen = kept in the soup
    study.store_search(mr.id, [(mr.id, i, r.name, json.dumps({}), study._final_key(r), json.dumps(own[f]),
                                result.candidates[f], int(f in result.ingredients))
                               for i, (f, r) in enumerate(folders.items())])


def _higher(scores: dict) -> dict[str, bool]:
    return {a: getattr(ABILITIES.get(a), "higher_is_better", True) for a in scores}


def choose(objectives: list[float]) -> int:
    """The index of the grid point a search picks: the best objective, the first of equals in grid order."""
    return max(range(len(objectives)), key=lambda i: (objectives[i], -i))


def _search(study: Study, m: MergeEntry, run_id: str, points: list[MergeRun], keys: list[str]) -> int:
    """Score every point on the validation problems; store the search; the chosen point's index
    (the best objective; the first of equals, in grid order)."""
    scored = []
    for mr, key in zip(points, keys):
        scores = study.validation_scores(key, study.model_dir(key), mr.id, m.search)
        scored.append((scores, objective(scores, m.search.weights, _higher(scores))))
    best = choose([obj for _, obj in scored])
    study.store_search(run_id, [(run_id, i, mr.name, json.dumps(mr.parameters), key, json.dumps(s), obj, int(i == best))
                                for i, (mr, key, (s, obj)) in enumerate(zip(points, keys, scored))])
    chosen = points[best]
    study.log(f"{run_id}: search chose {chosen.name} (validation mean {scored[best][1]:.3f} of "
              + ", ".join(f"{p.name} {o:.3f}" for p, (_, o) in zip(points, scored)) + ")")
    return best
