"""``mixtune analyze``: the analyses of :mod:`mixtune.analysis` on a study folder or a training run's folder.

A **study** folder (``results.sqlite``) gets the analysis nodes of its ``analysis`` section
(:mod:`mixtune.study_analysis`), restricted or extended by ``methods``, run on its trained models
(nothing is trained), stored with the study and shown in its rewritten ``report.html``; the
section is written to the folder's ``study.yaml``, so ``mixtune study`` and ``mixtune report``
keep them.

A **run** folder (``mixtune train``'s ``OUT``, with ``stages/``) compares the model after each
stage with the model training started from (``OUT/base`` for a built-in model, else the recipe's
``model`` or ``base``): the stages' task vectors, their intruder dimensions, each ability plain and
under conjugate prompts (a stage's forgetting: erased or suppressed), and the tuning
contribution. It writes ``OUT/analysis.json`` and ``OUT/analysis.html`` (the report's "why" section).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mixtune.core import CheckpointError, ConfigError, atomic_write_text
from mixtune.study_analysis import METHODS, AnalysisConfig, full_model, tuco_prompts, with_methods

RUN_METHODS = ("task_vectors", "intruders", "conjugate", "tuco")
"""The analyses of a run folder (skill localisation needs a study's specialists)."""
DEFAULT_METHODS = ("task_vectors", "intruders", "conjugate")
"""What ``mixtune analyze`` runs when neither ``--methods`` nor the study names any: the weight-space
analyses and the conjugate scores (TuCo and grafting take longer)."""


def analyze_study(folder: Path, methods: list[str] | None, *, log: Callable[[str], None] = print,
                  jobs: int = 1) -> Path:
    """Run the analyses on a study folder's trained models and rewrite its report (returned)."""
    from mixtune.core import load_config
    from mixtune.graph import run_graph
    from mixtune.study import Study, StudyConfig, expand, open_worker, run_node

    cfg = load_config(StudyConfig, folder / "study.yaml")
    analysis = cfg.analysis
    if methods:
        analysis = with_methods(analysis, methods)
    elif not analysis.methods():
        analysis = with_methods(analysis, list(DEFAULT_METHODS))
    cfg = cfg.model_copy(update={"analysis": analysis})
    study = Study(cfg, folder, log=log, jobs=jobs)
    runs = expand(cfg)
    nodes = [n for n in study.graph(runs) if n.kind == "analysis"]
    untrained = [r.id for r in runs if r.stages and not study._trained(study._final_key(r))]
    if untrained:
        raise CheckpointError(f"{folder}: {len(untrained)} runs are not trained yet ({', '.join(untrained[:3])}"
                              f"{', ...' if len(untrained) > 3 else ''}); run `mixtune study` on it first")
    log(f"analysis: {', '.join(analysis.methods())}; {len(nodes)} nodes")
    # the trained models are there, so every node's needs are met: run them as a graph of their own
    nodes = [n.__class__(n.key, n.kind, (), n.label) for n in nodes]
    run_graph(nodes, done=lambda n: study._actions[n.key][1](), execute=lambda n: study._actions[n.key][0](),
              jobs=jobs, worker=run_node, init=(open_worker, (str(folder), str(study.base_dir))), log=log)
    return study.report()


def run_models(folder: Path, base: Path | None = None) -> tuple[Path, list[tuple[str, Path]]]:
    """A run folder's starting model and its stages' models ``(name, folder)`` in training order (the
    order their exports were written)."""
    stages_dir = folder / "stages"
    stages = sorted((p for p in stages_dir.iterdir() if (p / "mixtune.yaml").exists()),
                    key=lambda p: (p / "mixtune.yaml").stat().st_mtime) if stages_dir.is_dir() else []
    if not stages:
        raise CheckpointError(f"{folder}: no trained stage in {stages_dir} (a `mixtune train` output folder has "
                              "stages/NAME/mixtune.yaml); for a study folder, pass the folder with results.sqlite")
    if base is None:
        if (folder / "base" / "config.json").exists():
            base = folder / "base"
        else:
            import yaml

            model = (yaml.safe_load((stages[0] / "mixtune.yaml").read_text()) or {}).get("model", "")
            base = Path(model)
            if not (base / "config.json").exists():
                raise CheckpointError(f"{folder}: the run started from {model!r}, not a model folder here; "
                                      "pass --base DIR")
    return base, [(p.name, p) for p in stages]


def run_abilities(folder: Path, abilities: list[str] | None) -> list[str]:
    """``abilities``, else the run's ``run.eval`` abilities, else its built-in sources'."""
    if abilities:
        return abilities
    import yaml

    from mixtune.data.abilities import ABILITIES

    last = run_models(folder)[1][-1][1]
    recipe = yaml.safe_load((last / "mixtune.yaml").read_text()) or {}
    named = ((recipe.get("run") or {}).get("eval") or {}).get("abilities")
    if named:
        return list(named)
    builtin = [s.get("builtin") for s in (recipe.get("sources") or {}).values() if isinstance(s, dict)]
    scored = [b for b in dict.fromkeys(builtin) if b and b in ABILITIES and ABILITIES.get(b).answer_format]
    if not scored:
        raise ConfigError(f"{folder}: which abilities? The recipe names no run.eval abilities and no scored "
                          "built-in source; pass --abilities")
    return scored


def analyze_run(folder: Path, methods: list[str] | None, *, abilities: list[str] | None = None, n: int = 100,
                base: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """The analyses of a run folder, written to ``analysis.json`` and ``analysis.html`` (returned as a dict,
    shaped as a study's :meth:`~mixtune.study_analysis.Analyses.report_data`, a stage per run)."""
    from mixtune.report.why import why_section

    names = list(methods or [m for m in DEFAULT_METHODS if m in RUN_METHODS])
    wrong = [m for m in names if m not in RUN_METHODS]
    if wrong:
        known = [m for m in wrong if m in METHODS]
        raise ConfigError(f"{', '.join(wrong)}: " + ("needs a study's specialists; analyse the study folder" if known
                                                     else f"unknown analysis; a run folder has {', '.join(RUN_METHODS)}"))
    cfg = with_methods(AnalysisConfig(), names)
    start, stages = run_models(folder, base)
    cache = folder / "analysis" / "full"
    full = {name: full_model(path, cache / name) for name, path in stages}
    out: dict = {}
    if cfg.task_vectors is not None:
        from mixtune.analysis import task_vector_table

        log(f"analysis: task vectors of {len(stages)} stages")
        out["task_vectors"] = [{"runs": list(full), "seed": 0, "amount": 1.0, **task_vector_table(
            start, list(full.values()), density=cfg.task_vectors.density)}]
    if cfg.intruders is not None:
        from mixtune.analysis import intruder_table

        s = cfg.intruders
        out["intruders"] = []
        for name, path in full.items():
            log(f"analysis: intruder dimensions of {name}")
            out["intruders"].append({"run": name, "k": s.k, "eps": s.eps,
                                     "rows": intruder_table(start, path, k=s.k, eps=tuple(s.eps))})
    if cfg.conjugate is not None or cfg.tuco is not None:
        wanted = run_abilities(folder, abilities)
        out |= _behaviour(start, stages, wanted, cfg, n=n, log=log)
    atomic_write_text(folder / "analysis.json", json.dumps(out, indent=1))
    from mixtune.report.html import CSS

    page = ["<!doctype html><html><head><meta charset='utf-8'><title>mixtune analyze</title>"
            f"<style>{CSS}</style></head><body><h1>mixtune analyze {folder.name}</h1>",
            f"<p class=muted>Each stage's model compared with the starting model {start}.</p>",
            *why_section(out, wanted if (cfg.conjugate or cfg.tuco) else []), "</body></html>"]
    atomic_write_text(folder / "analysis.html", "\n".join(page))
    return out


def _behaviour(start: Path, stages: list[tuple[str, Path]], abilities: list[str], cfg: AnalysisConfig, *, n: int,
               log) -> dict:
    """Conjugate and plain scores of the start and every stage, and each stage's TuCo."""
    from mixtune.eval import evaluate, load_for_eval
    from mixtune.eval.tasks import tasks_in
    from mixtune.report.paired import standard_error
    from mixtune.report.why import paired_scores

    names, tasks = tasks_in(abilities)
    out: dict = {}
    models = [("start", start), *stages]
    if cfg.conjugate is not None:
        from mixtune.analysis import applies, conjugate_scores

        rows = []
        for name, path in models:
            log(f"analysis: {name}: plain and conjugate scores of {', '.join(names)} ({n} problems each)")
            model, tokenizer = load_for_eval(path)
            plain = evaluate(model, tokenizer, names, n=n, tasks=tasks)
            for t in cfg.conjugate.transforms:
                which = [a for a in names if applies(t, a, tasks)]
                got = conjugate_scores(model, tokenizer, which, [t], tasks=tasks, n=n)[t] if which else {}
                for a, sc in got.items():
                    first = [float(x["score"]) for x in plain[a].examples]
                    second = [float(x["score"]) for x in sc.examples]
                    rows.append({"run": name, "ability": a, "transform": t, **paired_scores(first, second)})
        out["conjugate"] = rows
    if cfg.tuco is not None:
        from mixtune.analysis import tuning_contribution

        base, _ = load_for_eval(start)
        rows = []
        for name, path in stages:
            log(f"analysis: {name}: tuning contribution on {cfg.tuco.n} prompts per ability")
            tuned, tokenizer = load_for_eval(path)
            per = {}
            for a in names:
                prompts = tuco_prompts(a, cfg.tuco.n, tokenizer, tasks)
                if not prompts:
                    continue
                values = tuning_contribution(base, tuned, tokenizer, prompts)
                per[a] = {"mean": sum(values) / len(values), "se": standard_error(values), "n": len(values),
                          "values": values}
            rows.append({"run": name, "abilities": per})
        out["tuco"] = rows
    return out
