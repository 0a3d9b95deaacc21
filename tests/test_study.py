import csv
import json
import shutil

import pytest
import torch

from mixtune.core import validate
from mixtune.study import Study, StudyConfig, expand, stage_keys


def config(tiny_dir, **kw) -> StudyConfig:
    return validate(StudyConfig, {
        "model": str(tiny_dir),
        "sources": {"echo": {"builtin": "echo", "n": 30}} | {n: {"builtin": n, "n": 40}
                                                           for n in ("math", "code", "general")},
        "format": {"seq_len": 128},
        "prefix": [{"name": "0-pre", "mixture": {"sources": {"echo": {}}}, "steps": 2}],
        "specialists": ["math", "code", "general"],
        "strategies": [{"name": "multi_task"}, {"name": "sequential", "order": ["math", "code", "general"]},
                       {"name": "mixed_sequential"}, {"name": "dmt", "k": [0.125, 0.5]}],
        "train": {"lr": 1e-3, "steps": 2, "batch_size": 4, "micro_batch_size": 4, "precision": "fp32"},
        "eval": {"n": 3, "abilities": ["math", "general"]},
    } | kw)


def test_grid_expands_and_shares_stage_prefixes(tiny_dir):
    cfg = config(tiny_dir)
    runs = {r.name: r for r in expand(cfg)}
    assert list(runs) == ["base", "specialist:math", "specialist:code", "specialist:general", "multi_task",
                          "sequential", "mixed_sequential", "dmt(k=0.125)", "dmt(k=0.5)"]
    keys = {n: stage_keys(cfg, r) for n, r in runs.items()}
    assert len({k[0] for k in keys.values()}) == 1  # every run starts with the one prefix stage
    assert keys["specialist:math"] == keys["sequential"][:2]  # the math specialist is sequential's first stage
    assert keys["mixed_sequential"][1] == keys["dmt(k=0.125)"][1] == keys["dmt(k=0.5)"][1]  # shared stage 1
    assert len({keys["mixed_sequential"][2], keys["dmt(k=0.125)"][2], keys["dmt(k=0.5)"][2]}) == 3
    distinct = {k for ks in keys.values() for k in ks}
    # prefix, 3 specialists, multi, seq-code, seq-general, mixed stage 1, mixed stage 2, two DMT stage 2s
    assert len(distinct) == 11
    # anything that changes the weights changes the key
    assert stage_keys(config(tiny_dir, seeds=[1]), expand(config(tiny_dir, seeds=[1]))[1]) != keys["specialist:math"]
    other = config(tiny_dir, train={"lr": 2e-3, "steps": 2, "batch_size": 4, "micro_batch_size": 4})
    assert stage_keys(other, expand(other)[1]) != keys["specialist:math"]
    fused = config(tiny_dir, train={"lr": 1e-3, "steps": 2, "batch_size": 4, "micro_batch_size": 4,
                                    "precision": "fp32", "fused_loss": "liger"})
    assert stage_keys(fused, expand(fused)[1]) != keys["specialist:math"]  # fused kernels round differently
    # how a run goes (logging, checkpoints, evaluations during training) is not what it trains
    quiet = config(tiny_dir, run={"log_every": 1, "save_every": 1, "keep_checkpoints": 3})
    assert stage_keys(quiet, expand(quiet)[1]) == keys["specialist:math"]


def test_study_trains_each_stage_once_resumes_and_reports(tiny_dir, tmp_path):
    cfg = config(tiny_dir)
    trained: list[str] = []

    class Stop(Exception):
        pass

    def stop_after_4(key):
        trained.append(key)
        if len(trained) == 4:
            raise Stop

    with pytest.raises(Stop):
        Study(cfg, tmp_path, progress=False, log=lambda m: None).run(on_stage=stop_after_4)
    study = Study(cfg, tmp_path, progress=False, log=lambda m: None)
    study.run(on_stage=trained.append)
    assert len(trained) == len(set(trained)) == 11  # 4 before the interruption + 7 after, none twice
    rows = study.results()
    assert len(rows) == 9 * 2 and {r["ability"] for r in rows} == {"math", "general"}
    with open(tmp_path / "scores.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 18 and table[0]["seed"] == "0" and "params" in table[0]

    again: list[str] = []
    evaluated: list[str] = []
    study2 = Study(cfg, tmp_path, progress=False, log=evaluated.append)
    study2.run(on_stage=again.append)
    assert again == [] and not any("evaluating" in m for m in evaluated)  # nothing redone

    html = study2.report(notes=["test"]).read_text()
    for section in ("<h2>Scores</h2>", "<h2>Abilities per run</h2>", "<h2>Gains and forgetting</h2>",
                    "<h2>Training loss per ability</h2>"):
        assert section in html
    assert html.count("data:image/png;base64,") == 2
    assert "dmt(k=0.125)" in html and "vs specialist" in html
    assert "<h2>Data amount</h2>" not in html  # only one amount


def test_data_amounts_add_scaling_curves(tiny_dir, tmp_path):
    cfg = config(tiny_dir, amounts=[0.5, 1.0], specialists=["math"], strategies=[])
    study = Study(cfg, tmp_path, progress=False, log=lambda m: None)
    study.run()
    assert {(r["name"], r["amount"]) for r in study.results()} == {
        ("base", 0.5), ("base", 1.0), ("specialist:math", 0.5), ("specialist:math", 1.0)}
    assert "<h2>Data amount</h2>" in study.report().read_text()


def test_methods_axis_repeats_runs_per_method_and_trains_adapters_as_adapters(tiny_dir, tmp_path):
    cfg = config(tiny_dir, strategies=[{"name": "sequential", "order": ["math", "general"]}], specialists=["math"],
                 methods=[{"name": "full"}, {"name": "lora", "r": 2}, {"name": "hft"}], method_lr={"lora": 5e-3})
    runs = {r.name: r for r in expand(cfg)}
    assert list(runs) == ["base", "specialist:math [full]", "sequential [full]", "specialist:math [lora(r=2)]",
                          "sequential [lora(r=2)]", "specialist:math [hft]", "sequential [hft]"]
    keys = {n: stage_keys(cfg, r) for n, r in runs.items()}
    plain = config(tiny_dir, strategies=[{"name": "sequential", "order": ["math", "general"]}], specialists=["math"])
    # the study's own method shares its stages with a study without a methods axis; others share only the prefix
    assert keys["sequential [full]"] == stage_keys(plain, {r.name: r for r in expand(plain)}["sequential"])
    assert len({keys[n][0] for n in keys if n != "base"}) == 1
    assert len({keys["sequential [full]"][1], keys["sequential [lora(r=2)]"][1], keys["sequential [hft]"][1]}) == 3
    trained: list[str] = []
    study = Study(cfg, tmp_path, progress=False, log=lambda m: None)
    study.run(on_stage=trained.append)
    assert len(trained) == 1 + 3 * 2
    lora_final = keys["sequential [lora(r=2)]"][-1]
    assert (study.model_dir(lora_final) / "adapter_config.json").exists()
    # saved as an adapter only (no merged full model unless the method says merge: true); the run's stages
    # after the prefix go on training one adapter (as `mixtune train` does), so its base is the prefix's
    # model, named relative to the adapter so the study folder can be moved whole
    assert not (study.model_dir(lora_final) / "merged").exists()
    assert study.model_path(lora_final) == study.model_dir(lora_final)
    base = json.loads((study.model_dir(lora_final) / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == f"../{keys['sequential [lora(r=2)]'][0]}"
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.copytree(tmp_path, moved, symlinks=True)
    from mixtune.eval import load_for_eval

    a, _ = load_for_eval(study.model_dir(lora_final))
    b, _ = load_for_eval(moved / "models" / lora_final)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    rows = study.db.execute("SELECT key, trainable, optimizer_bytes, peak_rss_mb FROM stages").fetchall()
    by_key = {k: (t, b, m) for k, t, b, m in rows}
    full_n, lora_n = by_key[keys["sequential [full]"][1]][0], by_key[keys["sequential [lora(r=2)]"][1]][0]
    assert 0 < lora_n < by_key[keys["sequential [hft]"][1]][0] < full_n
    assert all(m is not None and m > 0 for *_, m in rows)  # peak memory per stage (Linux)
    assert {r["name"] for r in study.results()} >= {"sequential [lora(r=2)]", "sequential [hft]"}


def test_scores_during_training_are_stored_plotted_and_change_no_stage_key(tiny_dir, tmp_path):
    from mixtune.core import ConfigError
    from mixtune.eval import evaluate, load_for_eval

    train = {"lr": 1e-3, "steps": 2, "batch_size": 4, "micro_batch_size": 4, "precision": "fp32"}
    during = {"eval": {"every": 1, "abilities": ["math"], "n": 2}}
    plain = config(tiny_dir, specialists=["math"], strategies=[], train=train)
    cfg = config(tiny_dir, specialists=["math"], strategies=[], train=train, run=during)
    run = expand(cfg)[1]
    assert stage_keys(cfg, run) == stage_keys(plain, expand(plain)[1])  # it never changes the weights
    study = Study(cfg, tmp_path, progress=False, log=lambda m: None)
    study.run()
    prefix, math = stage_keys(cfg, run)
    rows = list(study.db.execute("SELECT stage_key, step, ability FROM train_evals ORDER BY rowid"))
    # the start and both steps of the prefix; the math stage's start is the prefix's end, not evaluated twice
    assert rows == [(prefix, 0, "math"), (prefix, 1, "math"), (prefix, 2, "math"), (math, 1, "math"), (math, 2, "math")]
    (score,) = study.db.execute("SELECT score FROM train_evals WHERE stage_key = ? AND step = 2", (math,)).fetchone()
    model, tok = load_for_eval(study.model_path(math))
    assert score == evaluate(model, tok, ["math"], n=2)["math"].score
    html = study.report().read_text()
    assert "<h2>Scores during training</h2>" in html and html.count("data:image/png;base64,") == 3
    with pytest.raises(ConfigError, match="keep_best is for `mixtune train`"):
        Study(config(tiny_dir, run={"eval": during["eval"] | {"keep_best": "math"}}), tmp_path / "b")


@pytest.mark.parametrize("train", [{}, {"masked_thought": {"rate": 0.3}},
                                   {"method": {"name": "hft"}}, {"method": {"name": "lora", "r": 4}}])
def test_a_recipe_gives_the_same_weights_through_train_and_study(tiny_dir, tmp_path, train):
    """Issue #16: a study trains one stage per node; its stage 2 must see stage 2's data order,
    Masked Thought stream and method randomness, and (LoRA) go on training the adapter of stage 1,
    as `mixtune train` does: both run the same node function."""
    from safetensors.torch import load_file

    from mixtune.pipeline import run_training
    from mixtune.recipe import Recipe

    common = {"model": str(tiny_dir), "sources": {n: {"builtin": n, "n": 40} for n in ("math", "general")},
              "format": {"seq_len": 128},
              "train": {"lr": 1e-3, "steps": 3, "batch_size": 4, "micro_batch_size": 4, "precision": "fp32"}
              | train}
    cfg = validate(StudyConfig, common | {"strategies": [{"name": "dmt", "k": 0.25}], "eval": {"n": 1}})
    recipe = validate(Recipe, common | {"strategy": {"name": "dmt", "k": 0.25}})
    (exported_1, exported_2) = run_training(recipe, tiny_dir, tmp_path / "train", progress=False)
    study = Study(cfg, tmp_path / "study", progress=False, log=lambda m: None)
    run = next(r for r in expand(cfg) if r.name.startswith("dmt"))
    keys = stage_keys(cfg, run)
    study.graph()
    for i in range(len(keys)):  # the run's stage nodes only: the weights are what is compared
        study._train_stage(run, i)
    name = "adapter_model.safetensors" if "lora" in str(train) else "model.safetensors"
    for key, folder in zip(keys, (exported_1, exported_2)):
        mine, theirs = load_file(study.model_dir(key) / name), load_file(folder / name)
        for k, v in theirs.items():
            assert torch.equal(v, mine[k]), (key, k)


def test_jobs_run_independent_nodes_at_once_in_processes_with_the_same_results(tiny_dir, tmp_path):
    """Issue #16 item 7: `--jobs 2` trains the two specialists (both need only the prefix) at once, in
    other processes, and every model and score is what one process gives."""
    from safetensors.torch import load_file

    cfg = config(tiny_dir, specialists=["math", "general"], strategies=[], eval={"n": 2, "abilities": ["math"]})
    one = Study(cfg, tmp_path / "one", progress=False, log=lambda m: None)
    one.run()
    log: list[str] = []
    two = Study(cfg, tmp_path / "two", progress=False, log=log.append, jobs=2)
    two.run()
    assert any(m.startswith("graph: starting") and m.endswith("(2 running)") for m in log)
    keys = {k for r in expand(cfg) for k in stage_keys(cfg, r)}
    assert len(keys) == 3
    for key in keys:
        a, b = (load_file(s.model_dir(key) / "model.safetensors") for s in (one, two))
        assert all(torch.equal(v, b[k]) for k, v in a.items()), key
    assert [(r["run_id"], r["value"]) for r in one.results()] == [(r["run_id"], r["value"]) for r in two.results()]
    log.clear()
    Study(cfg, tmp_path / "two", progress=False, log=log.append, jobs=2).run()  # a rerun does nothing
    assert not any("graph: starting" in m or "training" in m or "evaluating" in m for m in log)
