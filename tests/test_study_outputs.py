"""What a study leaves for its reader: model folders in scores.csv and the report, readable run links,
the original run's metadata across reruns and `mixtune report`, and overall progress."""

import csv
import os
import re
import shutil

import pytest

from mixtune.core import validate
from mixtune.study import Study, StudyConfig, expand, link_names, stage_keys


def small(tiny_dir) -> StudyConfig:
    return validate(StudyConfig, {
        "model": str(tiny_dir),
        "sources": {"echo": {"builtin": "echo", "n": 30}} | {n: {"builtin": n, "n": 40} for n in ("math", "general")},
        "format": {"seq_len": 128},
        "prefix": [{"name": "0-pre", "mixture": {"sources": {"echo": {}}}, "steps": 2}],
        "specialists": ["math"],
        "strategies": [{"name": "dmt", "k": [0.125]}],
        "train": {"lr": 1e-3, "steps": 2, "batch_size": 4, "micro_batch_size": 4, "precision": "fp32"},
        "eval": {"n": 3, "abilities": ["math", "general"]},
    })


@pytest.fixture(scope="module")
def done(tiny_dir, tmp_path_factory):
    """A finished tiny study (base, specialist:math, dmt(k=0.125); 4 distinct stages) and its log."""
    out = tmp_path_factory.mktemp("study")
    log: list[str] = []
    study = Study(small(tiny_dir), out, progress=False, log=log.append)
    study.describe(title="my study", notes=["mixtune study my.yaml"])
    study.run()
    study.db.close()
    return out, log


def copy(done, tmp_path):
    shutil.copytree(done[0], tmp_path / "s", symlinks=True)
    return tmp_path / "s"


def test_link_names_are_safe_unique_and_readable():
    assert link_names([("base", 0, 1.0), ("specialist:math", 0, 1.0), ("dmt(k=0.125)", 0, 1.0),
                       ("sequential [lora(r=2)]", 0, 1.0), ("a/b|c", 0, 1.0), ("a-b-c", 0, 1.0), (".x", 0, 1.0)]) == [
        "base", "specialist-math", "dmt-k0.125", "sequential-lora-r2", "a-b-c", "a-b-c-2", "x"]
    assert link_names([("dmt(k=0.5)", 0, 1.0), ("dmt(k=0.5)", 1, 0.5)]) == ["dmt-k0.5-seed0-amount1",
                                                                             "dmt-k0.5-seed1-amount0.5"]
    long = link_names([("x" * 200, 0, 1.0)])[0]
    assert len(long) == 80 and re.fullmatch(r"x{71}-[0-9a-f]{8}", long)


def test_scores_csv_and_report_name_each_runs_model_folder(done, tiny_dir):
    out, _ = done
    cfg = small(tiny_dir)
    dmt = next(r for r in expand(cfg) if r.name == "dmt(k=0.125)")
    key = stage_keys(cfg, dmt)[-1]
    with open(out / "scores.csv") as f:
        table = {r["name"]: r for r in csv.DictReader(f)}
    assert table["dmt(k=0.125)"]["model_dir"] == f"models/{key}"
    assert table["dmt(k=0.125)"]["link"] == "runs/dmt-k0.125"
    assert table["specialist:math"]["link"] == "runs/specialist-math"
    assert table["base"]["model_dir"] == f"models/{stage_keys(cfg, expand(cfg)[0])[0]}"  # the prefix's model
    assert os.readlink(out / "runs" / "dmt-k0.125") == f"../models/{key}"
    assert (out / "runs" / "dmt-k0.125" / "config.json").exists()
    assert os.readlink(out / "runs" / "base") == f"../models/{stage_keys(cfg, expand(cfg)[0])[0]}"
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["base", "dmt-k0.125", "specialist-math"]
    html = Study(cfg, out, progress=False, log=lambda m: None).report().read_text()
    assert f"<code>runs/dmt-k0.125</code> → <code>models/{key}</code>" in html


def test_a_run_without_stages_names_its_local_starting_model(tiny_dir, tmp_path):
    cfg = small(tiny_dir).model_copy(update={"prefix": []})
    study = Study(cfg, tmp_path, progress=False, log=lambda m: None)
    base = expand(cfg)[0]
    assert base.stages == [] and study.run_folder(study._final_key(base)) == tiny_dir.resolve()


def test_links_are_updated_when_rerun(done, tiny_dir, tmp_path):
    out = copy(done, tmp_path)
    right = os.readlink(out / "runs" / "dmt-k0.125")
    (out / "runs" / "dmt-k0.125").unlink()
    (out / "runs" / "dmt-k0.125").symlink_to("../models/elsewhere")
    (out / "runs" / "gone").symlink_to("../models/elsewhere")  # a run no longer in the study
    (out / "runs" / "notes.txt").write_text("mine")  # not a link: left alone
    Study(small(tiny_dir), out, progress=False, log=lambda m: None).run()
    assert os.readlink(out / "runs" / "dmt-k0.125") == right
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["base", "dmt-k0.125", "notes.txt", "specialist-math"]


def test_rerun_and_report_keep_the_original_metadata(done, tiny_dir, tmp_path):
    out = copy(done, tmp_path)
    first = Study(small(tiny_dir), out, progress=False, log=lambda m: None).meta()
    assert first["title"] == "my study" and first["notes"] == ["mixtune study my.yaml"]
    assert first["invocations"] == 1 and first["minutes"] > 0 and "CPU cores" in first["machine"]
    again = Study(small(tiny_dir), out, progress=False, log=lambda m: None)
    again.describe(title="another title", notes=["mixtune study other.yaml"])  # a rerun: the original is kept
    again.run()
    meta = again.meta()
    assert meta["title"] == "my study" and meta["started"] == first["started"] and meta["invocations"] == 2
    assert meta["minutes"] > first["minutes"]  # summed over invocations
    expect = (f"{first['machine']}; started {first['started']}; {meta['minutes']:.1f} min in all (2 invocations)")
    html = again.report().read_text()
    again.db.close()
    assert "<title>my study</title>" in html and "mixtune study my.yaml" in html and expect in html
    assert "this invocation" not in html

    from mixtune.cli import report_cmd

    (out / "report.html").unlink()
    report_cmd(out)  # `mixtune report DIR`
    html = (out / "report.html").read_text()
    assert "<title>my study</title>" in html and "mixtune study my.yaml" in html and expect in html


def test_verdict_is_kept_for_mixtune_report(done, tiny_dir, tmp_path):
    out = copy(done, tmp_path)
    study = Study(small(tiny_dir), out, progress=False, log=lambda m: None)
    study.report(verdict=["--quick: no verdict"])
    assert "<li>--quick: no verdict</li>" in study.report().read_text()  # the stored verdict


def test_overall_progress_over_all_stages_with_an_eta(done):
    out, log = done
    # prefix, math (the specialist's, and DMT's stage 1 here), DMT's stage 2: 2 steps each
    assert "study: 3 runs, 3 distinct stages (3 to train, 6 steps)" in log
    lines = [m for m in log if m.startswith("study: stage ")]
    assert lines[0] == "study: stage 1/3 · 0/6 steps (0%) · ETA after the first steps"
    for i, line in enumerate(lines[1:], start=2):
        m = re.fullmatch(r"study: stage (\d)/3 · (\d)/6 steps \((\d+)%\) · ETA (\d+\.\d) min", line)
        assert m and int(m[1]) == i and int(m[2]) == 2 * (i - 1) and int(m[3]) == round(100 * (i - 1) / 3), line
    assert len(lines) == 3
    assert any(re.fullmatch(r"study: trained 3 stages, 6 steps, in \d+\.\d min", m) for m in log)


def test_cli_study_puts_the_verdict_in_the_report_and_keeps_the_title(done, tiny_dir, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from mixtune import cli

    out = copy(done, tmp_path)
    monkeypatch.setattr(cli, "console", Console(file=(buf := io.StringIO()), width=200, soft_wrap=True))
    def verdict(scores, items):
        return [f"runs scored: {', '.join(scores)}; per-problem scores of: {', '.join(items)}"]

    _, _, lines = cli._run_study(small(tiny_dir), out, tmp_path, title="rerun title", notes=[], verdict=verdict)
    assert lines == ["runs scored: base, specialist:math, dmt(k=0.125); per-problem scores of: base, specialist:math, "
                     "dmt(k=0.125)"]
    html = (out / "report.html").read_text()
    assert "<title>my study</title>" in html and f"<li>{lines[0]}</li>" in html
    assert lines[0] not in buf.getvalue()  # printing it is the caller's (the demo's) part
    assert "min in all" in buf.getvalue() and f"models: {out / 'runs'}/" in buf.getvalue()


def with_eval(tiny_dir, **kw) -> StudyConfig:
    cfg = small(tiny_dir)
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update=kw)})


def csv_rows(out) -> list[dict]:
    with open(out / "scores.csv") as f:
        return list(csv.DictReader(f))


def test_every_setting_that_decides_a_score_is_in_its_key(tiny_dir):
    from mixtune.study import ability_identity, eval_key, eval_settings, study_eval_settings

    cfg = small(tiny_dir)
    base = study_eval_settings(cfg.eval, "math")
    assert base == eval_settings(ability_identity("math"), n=3, seed=0, difficulty=1, condition=None)
    assert base["ability"] == {"name": "math", "version": 2} and base["decoding"] == {"do_sample": False}
    key = eval_key("m1", base)
    changed = [study_eval_settings(with_eval(tiny_dir, **kw).eval, "math")
               for kw in ({"n": 4}, {"seed": 1}, {"difficulty": 2}, {"condition": "math"})]
    changed += [study_eval_settings(cfg.eval, "general"), base | {"decoding": {"do_sample": True, "temperature": 0.7}}]

    class Bumped:  # a newer version of the ability, then one defined from a file (with a content hash)
        version = 3

    class FromFile:
        version, content_hash = 1, "ab12"

    changed += [base | {"ability": ability_identity("math", Bumped())},
                base | {"ability": ability_identity("math", FromFile())}]
    keys = [eval_key("m1", s) for s in changed]
    assert len({key, *keys}) == len(keys) + 1  # each one changes the key
    assert eval_key("m2", base) != key  # so does the model
    assert ability_identity("math", FromFile()) == {"name": "math", "version": 1, "content": "ab12"}
    # how it runs is not part of it: the batch size
    assert study_eval_settings(with_eval(tiny_dir, batch_size=7).eval, "math") == base


def test_changing_eval_n_evaluates_again_and_changing_it_back_reuses_the_scores(done, tiny_dir, tmp_path):
    out = copy(done, tmp_path)
    before = csv_rows(out)
    assert {r["n"] for r in before} == {"3"} and all(r["se"] != "" for r in before)

    log: list[str] = []
    study = Study(with_eval(tiny_dir, n=4), out, progress=False, log=log.append)
    study.run()
    assert sum("evaluating math, general on 4 held-out problems" in m for m in log) == 3  # every run's model
    after = csv_rows(out)
    assert {r["n"] for r in after} == {"4"} and {r["eval_key"] for r in after}.isdisjoint(r["eval_key"] for r in before)
    items = study.item_scores()
    assert {len(s) for by in items.values() for s in by.values()} == {4}
    assert [r["value"] for r in after] == [
        str(sum(items[r["name"]][r["ability"]]) / 4) for r in after]  # the scores of the new problems
    study.db.close()

    log.clear()
    Study(small(tiny_dir), out, progress=False, log=log.append).run()
    assert not any("evaluating" in m for m in log)  # n back to 3: the earlier scores, not evaluated again
    assert csv_rows(out) == before


def test_scores_carry_their_standard_error_and_the_report_pairs_runs_with_the_base(done, tiny_dir, tmp_path):
    import math

    from mixtune.report import mcnemar

    out = copy(done, tmp_path)
    rows = csv_rows(out)
    assert {"se", "eval_seed", "difficulty", "condition", "eval_key"} <= set(rows[0])
    for r in rows:  # 0/1 scores: binomial sqrt(p(1-p)/n)
        p, n = float(r["value"]), int(r["n"])
        assert float(r["se"]) == pytest.approx(math.sqrt(p * (1 - p) / n))
    study = Study(small(tiny_dir), out, progress=False, log=lambda m: None)
    items = study.item_scores()
    assert set(items) == {"base", "specialist:math", "dmt(k=0.125)"}
    assert all(len(s) == 3 and set(s) <= {0.0, 1.0} for by in items.values() for s in by.values())
    problems = {k for (k,) in study.db.execute("SELECT DISTINCT problems_key FROM evals WHERE ability = 'math'")}
    assert len(problems) == 1  # every model answered the same math problems: they can be paired
    html = study.report().read_text()
    assert "<h2>Paired comparisons with the base</h2>" in html
    p = mcnemar(items["dmt(k=0.125)"]["math"], items["base"]["math"]).p
    assert "<tr><td>dmt(k=0.125)</td><td>math</td>" in html and f"<td>McNemar</td><td>{p:.3g}</td><td>3</td>" in html
    assert (out / "evals" / rows[0]["eval_key"] / "outputs.jsonl").exists()


def test_scores_of_a_study_folder_from_before_are_not_shown_and_evaluated_again(done, tiny_dir, tmp_path):
    import sqlite3

    out = copy(done, tmp_path)
    db = sqlite3.connect(out / "results.sqlite")  # the database as mixtune wrote it before scores were keyed
    db.executescript("DROP TABLE evals; DROP TABLE items; CREATE TABLE scores (model_key TEXT, ability TEXT, "
                     "metric TEXT, value REAL, n INTEGER, version INTEGER, higher_is_better INTEGER, "
                     "PRIMARY KEY (model_key, ability, metric));")
    keys = [k for (k,) in db.execute("SELECT final_key FROM runs")]
    db.executemany("INSERT INTO scores VALUES (?,?,?,?,?,?,?)",  # of unknown seed, difficulty, condition
                   [(k, a, "accuracy", 0.99, 3, 1, 1) for k in keys for a in ("math", "general")])
    db.commit()
    db.close()

    log: list[str] = []
    study = Study(small(tiny_dir), out, progress=False, log=log.append)
    assert any("6 scores" in m and "not shown" in m and "legacy_scores" in m for m in log)
    assert study.results() == []
    assert "No scores yet" in study.report().read_text()  # `mixtune report` before a rerun
    study.run()
    assert sum("evaluating" in m for m in log) == 3
    rows = csv_rows(out)
    assert len(rows) == 6 and all(r["value"] != "0.99" for r in rows)
    assert study.db.execute("SELECT COUNT(*) FROM legacy_scores").fetchone() == (6,)  # kept, not read
    study.db.close()
    log.clear()
    Study(small(tiny_dir), out, progress=False, log=log.append)
    assert log == []  # said once


def test_an_ability_from_a_file_is_keyed_by_its_contents(tmp_path):
    from mixtune.eval.tasks import CodeTask
    from mixtune.study import ability_identity

    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"prompt": "def f():", "test": "", "entry_point": "f"}\n')
    task = CodeTask(path=problems)
    first = ability_identity("mine", task)
    assert first["name"] == "mine" and first["version"] == 1 and len(first["content"]) == 16
    assert ability_identity("mine", task) == first
    problems.write_text('{"prompt": "def g():", "test": "", "entry_point": "g"}\n')  # the same file, edited
    assert ability_identity("mine", task)["content"] != first["content"]


def test_a_study_over_a_user_task_file_gives_the_same_report_sections(done, tiny_dir, tmp_path):
    """Abilities from a task file stand where built-in names do: scored per run, stored, reported."""
    import json

    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"q": f"What is {i} + {i}?", "a": str(2 * i)}) + "\n"
                                               for i in range(5)))
    (tmp_path / "tasks.yaml").write_text("tasks:\n  qa:\n    path: qa.jsonl\n    prompt: '{q}'\n    references: a\n"
                                         "    scorer: numeric\n    max_new_tokens: 6\n")
    out = copy(done, tmp_path)
    cfg = small(tiny_dir).model_copy(update={"eval": small(tiny_dir).eval.model_copy(
        update={"abilities": ["math", "tasks.yaml"]})})
    log: list[str] = []
    study = Study(cfg, out, base_dir=tmp_path, progress=False, log=log.append)
    study.run()
    assert study.abilities == ["math", "qa"]
    assert not any("training stage" in m for m in log)  # the models are reused; only qa is new to score
    rows = {(r["name"], r["ability"]): r for r in study.results()}
    assert {a for _, a in rows} == {"math", "qa"} and rows[("base", "qa")]["n"] == 3
    assert len(study.item_scores()["base"]["qa"]) == 3  # per problem, for the paired tests
    html = study.report().read_text()
    for section in ("Paired comparisons with the base", "qa"):
        assert section in html
    # the task file is kept by absolute path, so `mixtune report` finds it from anywhere
    from mixtune.core import load_config

    saved = load_config(StudyConfig, out / "study.yaml")
    assert saved.eval.abilities == ["math", str((tmp_path / "tasks.yaml").resolve())]
