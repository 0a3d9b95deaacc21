"""Analysis nodes in studies and `mixtune analyze` (issue #17, item 6): computed once from the trained
models, equal to the analysis functions run by hand, shown in the report; a run folder analysed stage
by stage."""

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from mixtune.analysis import intruder_table, task_vector_table
from mixtune.cli import app
from mixtune.core import ConfigError, validate
from mixtune.study import Study, StudyConfig, expand
from mixtune.study_analysis import Analyses, base_key, model_folder, tuco_prompts, with_methods

pytestmark = pytest.mark.usefixtures("one_thread")

ANALYSIS = {"task_vectors": {}, "intruders": {"eps": [0.5, 0.9], "mitigate": 0.5}, "conjugate": {"transforms": ["frame", "words"]},
            "tuco": {"n": 2}, "localize": {"sparsity": [0.01, 1.0], "n": 3}}


def config(tiny_dir, **kw) -> StudyConfig:
    return validate(StudyConfig, {
        "model": str(tiny_dir),
        "sources": {n: {"builtin": n, "n": 40} for n in ("math", "general")},
        "format": {"seq_len": 128},
        "specialists": ["math", "general"],
        "methods": [{"name": "full"}, {"name": "lora", "r": 2}],
        "method_lr": {"lora": 5e-2},
        "train": {"lr": 5e-3, "steps": 3, "batch_size": 4, "micro_batch_size": 4, "precision": "fp32"},
        "eval": {"n": 3, "abilities": ["math", "general"]},
    } | kw)


def plain_scores(study) -> dict:
    return {(row["name"], row["ability"]): row["value"] for row in study.results()}


@pytest.fixture(scope="module")
def analysed(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysed")
    logs = []
    study = Study(config(tiny_dir, analysis=ANALYSIS), out, progress=False, log=logs.append)
    study.run()
    study.report()
    return study, logs


def test_every_analysis_is_stored_equal_to_the_functions_and_reported(analysed, tiny_dir):
    study, _ = analysed
    runs = {r.name: r for r in expand(study.cfg)}
    data = Analyses(study, list(runs.values())).report_data()
    assert set(data) == {"task_vectors", "intruders", "conjugate", "tuco", "localize"}

    # task vectors: the four fine-tuned runs (two specialists x full, LoRA) over the base, as by hand
    (tv,) = data["task_vectors"]
    assert tv["runs"] == ["specialist:math [full]", "specialist:general [full]", "specialist:math [lora(r=2)]",
                          "specialist:general [lora(r=2)]"]
    r0 = runs[tv["runs"][0]]
    folders = [model_folder(study, study._final_key(runs[n]), runs[n]) for n in tv["runs"]]
    base = model_folder(study, base_key(study, r0), r0)
    assert base == tiny_dir  # no prefix: the starting model (a local folder) is the base
    direct = task_vector_table(base, folders)
    assert sum(tv["cosine"], []) == pytest.approx(sum(direct["cosine"], []), abs=1e-12)
    assert tv["sign_conflicts"] == direct["sign_conflicts"]
    # a LoRA run is analysed through its merge, written once under analysis/full/
    assert folders[2] == study.out / "analysis" / "full" / study._final_key(runs[tv["runs"][2]])

    # intruders: per run, the table of the functions; the report counts them per eps
    lora = next(x for x in data["intruders"] if x["run"] == "specialist:math [lora(r=2)]")
    assert lora["rows"] == intruder_table(base, folders[2], eps=(0.5, 0.9))
    # mitigation: the model with its intruders at eps 0.5 halved, scored on the same problems as the run
    changed = sum(m["intruders"]["0.5"] > 0 for m in lora["rows"])
    assert lora["mitigated"]["matrices"] == changed and lora["mitigated"]["lambda"] == 0.5
    assert [x["ability"] for x in lora["mitigated"]["scores"]] == ["math", "general"]
    for x in lora["mitigated"]["scores"]:
        assert x["plain"] == plain_scores(study)[(lora["run"], x["ability"])] and x["n"] == 3

    # conjugate: each run (base included) under each transform that applies, paired with its plain score
    conj = data["conjugate"]
    assert {(r["run"], r["ability"], r["transform"]) for r in conj} == {
        (n, a, t) for n in runs for a, t in [("math", "frame"), ("general", "frame"), ("math", "words")]}
    plain = plain_scores(study)
    for r in conj:
        assert r["plain"] == plain[(r["run"], r["ability"])] and r["n"] == 3 and 0 <= r["p"] <= 1

    # tuco: a share in [0, 1] per prompt, 2 prompts per ability
    for row in data["tuco"]:
        for a in ("math", "general"):
            assert row["abilities"][a]["n"] == 2 and all(0 <= v <= 1 for v in row["abilities"][a]["values"])

    # localize: grafting every entry (sparsity 1) gives the fine-tuned model, so its score
    loc = data["localize"]
    assert [x["run"] for x in loc["rows"]] == ["specialist:math [full]", "specialist:general [full]",
                                               "specialist:math [lora(r=2)]", "specialist:general [lora(r=2)]"]
    for x in loc["rows"]:
        assert x["curve"][-1]["scores"] == x["fine_tuned"]
        assert x["curve"][0]["kept"] == int(0.01 * x["parameters"])
    assert loc["overlap"]["jaccard"]["1"][0][0] == 1.0

    html = (study.out / "report.html").read_text()
    for heading in ("Why: what fine-tuning changed", "Task vectors", "conjugate prompts", "Intruder dimensions",
                    "Tuning contribution", "Skill localisation", "Mitigation"):
        assert heading in html


def test_a_rerun_computes_nothing_and_a_changed_setting_computes_again(analysed, tmp_path):
    study, _ = analysed
    folder = tmp_path / "s"
    shutil.copytree(study.out, folder, symlinks=True)
    logs = []
    again = Study(study.cfg, folder, progress=False, log=logs.append)
    again.run()
    assert not any("analysis" in m or "conjugate" in m or "intruder" in m or "graft" in m for m in logs), logs
    changed = study.cfg.model_copy(update={"analysis": with_methods(study.cfg.analysis, ["intruders"]).model_copy(
        update={"intruders": study.cfg.analysis.intruders.model_copy(update={"k": 3})})})
    logs.clear()
    Study(changed, folder, progress=False, log=logs.append).run()
    assert sum("intruder dimensions (k = 3)" in m for m in logs) == 4


def test_analysis_settings_are_checked(tiny_dir):
    with pytest.raises(ConfigError, match=r"analysis.conjugate.runs.0 = 'specialist:maths': not a run of this "
                                          r"study \(did you mean 'specialist:math \[full\]'\?\)"):
        config(tiny_dir, analysis={"conjugate": {"runs": ["specialist:maths"]}})
    with pytest.raises(ConfigError, match="unknown analysis 'tucco'"):
        with_methods(config(tiny_dir).analysis, ["tucco"])


def test_tuco_prompts_are_the_first_test_prompts_as_the_model_reads_them(tokenizer, tmp_path):
    from mixtune.data.abilities import ABILITIES
    from mixtune.data.format import prompt_text
    from mixtune.eval.tasks import ChoiceTask

    records = ABILITIES.get("math").generate(2, seed=3, split="test", difficulty=2)
    assert tuco_prompts("math", 2, tokenizer, {}, seed=3, difficulty=2, condition="<good>") == [
        prompt_text(r["messages"], tokenizer, "<good>") for r in records]
    mc = ChoiceTask(path=tmp_path / "qa.jsonl", prompt="{question}", choices="question", gold="answer")
    assert tuco_prompts("qa", 2, tokenizer, {"qa": mc}) == []  # a task that does not generate has none


def test_mixtune_analyze_adds_analyses_to_a_study_and_analyses_a_run_folder(analysed, tiny_dir, tmp_path):
    study, _ = analysed
    folder = tmp_path / "s"
    shutil.copytree(study.out, folder, symlinks=True)
    plain = config(tiny_dir).model_dump(mode="json", by_alias=True)
    (folder / "study.yaml").write_text(yaml.safe_dump(plain))  # a study without an analysis section
    result = CliRunner().invoke(app, ["analyze", str(folder), "--methods", "task_vectors"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((folder / "study.yaml").read_text())["analysis"]["task_vectors"] == {"density": 0.2}
    assert "Task vectors" in (folder / "report.html").read_text()

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_dir), "sources": {n: {"builtin": n, "n": 40} for n in ("math", "general")},
        "format": {"seq_len": 128}, "strategy": {"name": "sequential", "order": ["math", "general"]},
        "train": {"lr": 5e-3, "steps": 2, "batch_size": 4, "micro_batch_size": 4, "precision": "fp32"}}))
    run = tmp_path / "run"
    assert CliRunner().invoke(app, ["train", str(recipe), "--out", str(run)]).exit_code == 0
    result = CliRunner().invoke(app, ["analyze", str(run), "--methods", "task_vectors,intruders,conjugate",
                                      "--n", "2"])
    assert result.exit_code == 0, result.output
    out = json.loads((run / "analysis.json").read_text())
    assert out["task_vectors"][0]["runs"] == ["1-math", "2-general"]  # the stages, in training order
    direct = task_vector_table(tiny_dir, [run / "stages" / "1-math", run / "stages" / "2-general"])
    assert sum(out["task_vectors"][0]["cosine"], []) == pytest.approx(sum(direct["cosine"], []), abs=1e-12)
    assert {(r["run"], r["ability"], r["transform"]) for r in out["conjugate"]} == {
        (m, a, "frame") for m in ("start", "1-math", "2-general") for a in ("math", "general")}
    assert "Intruder dimensions" in (run / "analysis.html").read_text()
    bad = CliRunner().invoke(app, ["analyze", str(run), "--methods", "localize"])
    assert bad.exit_code != 0 and "needs a study's specialists" in str(bad.exception or bad.output)


def test_a_learned_region_is_grafted_and_scored(analysed, tmp_path):
    """``localize.learn``: the official optimisation from the basepatch, on the specialist's own
    training problems; the graft of the region it returns is what is scored."""
    from mixtune.analysis import graft, load_masks
    from mixtune.study_analysis import _state

    study, _ = analysed
    folder = tmp_path / "s"
    shutil.copytree(study.out, folder, symlinks=True)
    cfg = study.cfg.model_copy(update={"analysis": with_methods(study.cfg.analysis, ["localize"]).model_copy(
        update={"localize": study.cfg.analysis.localize.model_copy(update={"sparsity": [0.01], "learn": 1,
                                                                           "learn_n": 4})})})
    again = Study(cfg, folder, progress=False, log=lambda m: None)
    runs = expand(cfg)
    run = next(r for r in runs if r.name == "specialist:math [full]")
    node = Analyses(again, runs)
    node._localize(run)
    got = node._read(node._run_key("localize", run))
    assert got["learned"] and [p["sparsity"] for p in got["curve"]] == [0.01]
    masks = load_masks(folder / got["masks"]["0.01"])
    assert got["curve"][0]["kept"] == sum(int(m.sum()) for m in masks.values()) > 0
    # the region differs from the basepatch's (the learning moved it) or equals it: either way, scoring
    # its graft again gives the stored score
    from mixtune.eval import evaluate, load_for_eval

    base = _state(model_folder(again, base_key(again, run), run))
    tuned_dir = model_folder(again, again._final_key(run), run)
    model, tokenizer = load_for_eval(tuned_dir)
    model.load_state_dict(graft(base, _state(tuned_dir), masks), strict=False)
    e = cfg.eval
    scores = evaluate(model, tokenizer, ["math"], n=3, seed=e.seed, difficulty=e.difficulty)
    assert scores["math"].score == got["curve"][0]["scores"]["math"]
