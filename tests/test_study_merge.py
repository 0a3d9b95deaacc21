"""Merge nodes in studies (issue #16, item 5): merged specialists scored beside trained runs, computed
once, resumable, the same weights as `mixtune merge`, and a parameter search on validation problems."""

import csv
import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from mixtune.cli import app
from mixtune.core import ConfigError, validate
from mixtune.data.abilities import ABILITIES
from mixtune.eval import AbilityScore
from mixtune.study import EvalConfig, Study, StudyConfig, eval_key, expand, study_eval_settings
from mixtune.study_merges import MergeSearch, expand_merges, merge_key, validation_problems, validation_settings

TIES = {"method": "ties_paper", "of": ["specialist:math", "specialist:general"],
        "grid": {"density": [0.2, 0.5], "lambda": [1.0]}}


def config(tiny_dir, merges=(), **kw) -> StudyConfig:
    return validate(StudyConfig, {
        "model": str(tiny_dir),
        "sources": {n: {"builtin": n, "n": 40} for n in ("math", "general")},
        "format": {"seq_len": 128},
        "specialists": ["math", "general"],
        "train": {"lr": 1e-3, "steps": 2, "batch_size": 4, "micro_batch_size": 4, "precision": "fp32"},
        "eval": {"n": 2, "abilities": ["math", "general"]},
        "merges": list(merges),
    } | kw)


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """A study folder with the base and both specialists trained and scored (no merges yet)."""
    out = tmp_path_factory.mktemp("specialists")
    study = Study(config(tiny_dir), out, progress=False, log=lambda m: None)
    study.run()
    study.db.close()
    return out


def copy(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "s", symlinks=True)
    return tmp_path / "s"


def test_merge_entries_are_checked_when_the_study_is_read(tiny_dir, tmp_path):
    def problem(merge, **kw) -> str:
        with pytest.raises(ConfigError) as e:
            config(tiny_dir, [merge], **kw)
        return str(e.value)

    msg = problem(TIES | {"of": ["specialist:math", "specialist:maths"]})
    assert "merges.0.of.1 = 'specialist:maths': not a run of this study (did you mean 'specialist:math'?" in msg
    assert "merges.0.base" in problem(TIES | {"base": "nope"})
    assert "density" in problem(TIES | {"grid": {"density": [0.2, 1.5]}})  # every grid point is validated
    assert "unknown merge method" in problem(TIES | {"method": "tie"}).lower()
    assert "greedy_soup needs `search`" in problem({"method": "greedy_soup", "of": ["specialist:math"]})
    assert "search needs a `grid`" in problem({"method": "lines", "of": ["specialist:math"], "search": {}})
    tasks = tmp_path / "t.yaml"
    tasks.write_text(yaml.safe_dump({"tasks": {"qa": {"path": "qa.jsonl"}}}))
    msg = problem(TIES | {"search": {"n": 5}}, eval={"abilities": ["math", str(tasks)]})
    assert "merges.0.search" in msg and "only for built-in abilities" in msg
    with pytest.raises(ConfigError, match="taken by merges.0"):
        config(tiny_dir, [TIES, TIES])

    # --dry-run reads the study and lists the merge runs
    recipe = tmp_path / "study.yaml"
    recipe.write_text(yaml.safe_dump(config(tiny_dir, [TIES, TIES | {"name": "ties", "search": {"n": 4}}])
                                     .model_dump(mode="json", by_alias=True)))
    result = CliRunner().invoke(app, ["study", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "3 runs, 4 merges" in out and "ties_paper(density=0.5,lambda=1)|seed=0|amount=1" in out
    assert "ties(density=0.2,lambda=1)|seed=0" in out and "searched on validation" in out
    assert "6 models scored" in out  # 3 trained runs, 2 merges without search, 1 searched entry's choice


def test_merges_are_computed_once_resume_and_match_mixtune_merge(trained, tiny_dir, tmp_path, monkeypatch):
    import mixtune.study_merges as sm

    folder = copy(trained, tmp_path)
    cfg = config(tiny_dir, [TIES])
    merged: list[str] = []
    real = sm._merge

    class Killed(Exception):
        pass

    def merge_then_die(study, mr, key):
        real(study, mr, key)
        merged.append(key)
        raise Killed  # killed after the first merge is written

    monkeypatch.setattr(sm, "_merge", merge_then_die)
    with pytest.raises(Killed):
        Study(cfg, folder, progress=False, log=lambda m: None).run()
    monkeypatch.setattr(sm, "_merge", real)
    log: list[str] = []
    study = Study(cfg, folder, progress=False, log=log.append)
    study.run(on_stage=lambda key: pytest.fail(f"retrained {key}"))
    # the resumed run merges only the second point and evaluates only the two merged models
    assert [m.split(": ")[0] for m in log if "merging" in m] == ["ties_paper(density=0.5,lambda=1)|seed=0|amount=1"]
    assert sorted(m.split(":")[0] for m in log if "evaluating" in m) == [
        "ties_paper(density=0.2,lambda=1)|seed=0|amount=1", "ties_paper(density=0.5,lambda=1)|seed=0|amount=1"]

    points = expand_merges(cfg, expand(cfg))
    keys = [merge_key(study, mr) for mr in points]
    assert merged == keys[:1] and len(set(keys)) == 2
    assert all(study.merged(k) and (study.model_dir(k) / "model.safetensors").exists() for k in keys)

    # the same weights, bit for bit, as `mixtune merge` on the same models and parameters
    specialists = {r.name: study.final_model(r) for r in expand(cfg)}
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "ties_paper", "base_model": str(tiny_dir),
        "models": [{"model": str(specialists["specialist:math"])}, {"model": str(specialists["specialist:general"])}],
        "parameters": {"density": 0.5, "lambda": 1.0}}))
    result = CliRunner().invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    mine, theirs = load_file(study.model_dir(keys[1]) / "model.safetensors"), load_file(tmp_path / "cli" / "model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert not all(torch.equal(mine[k], load_file(study.model_dir(keys[0]) / "model.safetensors")[k]) for k in mine)

    # scored beside the trained runs: scores.csv, results, runs/ links
    with open(folder / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    by_name = {(r["name"], r["ability"]): r for r in rows}
    assert {n for n, _ in by_name} == {"base", "specialist:math", "specialist:general",
                                       "ties_paper(density=0.2,lambda=1)", "ties_paper(density=0.5,lambda=1)"}
    row = by_name[("ties_paper(density=0.5,lambda=1)", "math")]
    assert row["strategy"] == "merge" and row["model_dir"] == f"models/{keys[1]}" and row["n"] == "2"
    assert json.loads(row["params"])["parameters"] == {"density": 0.5, "lambda": 1.0}
    assert (folder / "runs" / "ties_paper-density0.5-lambda1").resolve() == study.model_dir(keys[1]).resolve()
    # evaluated exactly as a trained run: the same eval key rule, per-problem scores in items
    ek = study._eval_keys(keys[1])["math"]
    assert row["eval_key"] == ek
    assert study.db.execute("SELECT COUNT(*) FROM items WHERE eval_key = ?", (ek,)).fetchone() == (2,)
    assert "ties_paper(density=0.2,lambda=1)" in study.report().read_text()

    # a rerun does nothing: no training, no merge, no evaluation
    again: list[str] = []
    Study(cfg, folder, progress=False, log=again.append).run(on_stage=lambda key: pytest.fail(f"retrained {key}"))
    assert not any("merging" in m or "evaluating" in m for m in again), again


def test_search_scores_the_grid_on_validation_problems_and_tests_only_the_choice(trained, tiny_dir, tmp_path,
                                                                                 monkeypatch):
    import mixtune.study_merges as sm

    folder = copy(trained, tmp_path)
    search = TIES | {"name": "ties", "search": {"n": 3}}
    soup = {"method": "greedy_soup", "of": ["specialist:math", "specialist:general"], "search": {"n": 3}}
    cfg = config(tiny_dir, [search, soup])
    study = Study(cfg, folder, progress=False, log=lambda m: None)
    ties, greedy = [], []
    for mr in expand_merges(cfg, expand(cfg)):
        (ties if mr.entry == 0 else greedy).append(merge_key(study, mr))
    runs = {r.name: study._final_key(r) for r in expand(cfg)}
    # hand-set validation scores per model folder: point 1 has the better mean (0.45 vs 0.35)
    hand = {ties[0]: {"math": 0.2, "general": 0.5}, ties[1]: {"math": 0.6, "general": 0.3},
            runs["specialist:math"]: {"math": 0.5, "general": 0.3}, runs["specialist:general"]: {"math": 0.1, "general": 0.4}}
    seen: dict[str, dict[str, list[dict]]] = {}

    def fake(model_dir, records, *, batch_size, condition):
        seen[model_dir.name] = records
        scores = hand.get(model_dir.name, {"math": 0.9, "general": 0.9})  # a trial soup: better than either
        return {a: AbilityScore(a, scores[a], len(r), 1, examples=[{"score": scores[a]}] * len(r))
                for a, r in records.items()}

    monkeypatch.setattr(sm, "score_validation", fake)
    log: list[str] = []
    study = Study(cfg, folder, progress=False, log=log.append)
    study.run()
    (name, key, params), = study.db.execute("SELECT name, final_key, params FROM runs WHERE name = 'ties'")
    assert key == ties[1] and json.loads(params)["parameters"]["density"] == 0.5 and json.loads(params)["searched"]
    # only the chosen point is scored on the test problems
    tested = {k for (k,) in study.db.execute("SELECT model_key FROM evals WHERE settings NOT LIKE '%validation%'")}
    assert ties[1] in tested and ties[0] not in tested
    (s,) = [s for s in study.searches() if s["run"].startswith("ties|")]
    assert [(p["name"], p["objective"], p["chosen"]) for p in s["points"]] == [
        ("ties(density=0.2,lambda=1)", pytest.approx(0.35), False), ("ties(density=0.5,lambda=1)", pytest.approx(0.45), True)]
    assert s["points"][0]["scores"] == hand[ties[0]]
    html = study.report().read_text()
    assert "<h2>Merge-parameter search</h2>" in html and "ties(density=0.5,lambda=1)" in html
    # the validation problems are the search's n per ability, none of them a test problem
    test_prompts = {r["messages"][0]["content"] for a in ("math", "general")
                    for r in ABILITIES.get(a).generate(2, seed=0, split="test")}
    for records in seen.values():
        assert {a: len(r) for a, r in records.items()} == {"math": 3, "general": 3}
        assert not test_prompts & {r["messages"][0]["content"] for rs in records.values() for r in rs}

    # greedy soup: both candidates kept (the average scores higher than the best alone)
    soup_key = greedy[0]
    assert json.loads((study.model_dir(soup_key) / "soup.json").read_text())["score"] == pytest.approx(0.9)
    (g,) = [s for s in study.searches() if s["run"].startswith("greedy_soup|")]
    assert [(p["name"], p["chosen"]) for p in g["points"]] == [("specialist:math", True), ("specialist:general", True)]
    assert {r["name"] for r in study.results()} >= {"ties", "greedy_soup"}

    # another weighting picks the other point from the stored validation scores: nothing merged or
    # scored on validation again, only the newly chosen point on the test problems
    weighted = config(tiny_dir, [search | {"search": {"n": 3, "weights": {"general": 3}}}, soup])
    seen.clear()
    log.clear()
    study = Study(weighted, folder, progress=False, log=log.append)
    study.run()
    assert seen == {} and not any("merging" in m for m in log)
    assert [m.split(":")[0] for m in log if "evaluating" in m] == ["ties|seed=0|amount=1"]
    (key,) = study.db.execute("SELECT final_key FROM runs WHERE name = 'ties'").fetchone()
    assert key == ties[0]  # (0.2 + 3 * 0.5) / 4 = 0.425 > (0.6 + 3 * 0.3) / 4 = 0.375


def test_validation_problems_are_held_out_and_apart_from_the_test_problems():
    e = EvalConfig(n=200, seed=0)
    search = MergeSearch(n=100, seed=0)
    for name in ("math", "code", "general"):
        impl = ABILITIES.get(name)
        test = impl.problems(e.n, seed=e.seed, split="test", difficulty=e.difficulty)
        # the test problems are what evaluation scores (generate is problems as records)
        assert [r["messages"][0]["content"] for r in impl.generate(e.n, seed=e.seed, split="test")] == [
            f"{p.prompt}\n{impl.instruction}" for p in test]
        val = impl.problems(search.n, seed=search.seed, split="test", difficulty=e.difficulty, stream="validation",
                            exclude={p.key for p in test})
        assert len(val) == 100 and not {p.key for p in val} & {p.key for p in test}
        records = validation_problems(e, search, name)
        assert [r["answer"] for r in records] == [p.answer for p in val]
        assert not {r["messages"][0]["content"] for r in records} & {
            r["messages"][0]["content"] for r in impl.generate(e.n, seed=e.seed, split="test")}
    # a model's validation scores are keyed apart from its test scores
    assert eval_key("k", validation_settings(e, search, "math")) != eval_key("k", study_eval_settings(e, "math"))
