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
    verdict = lambda scores: [f"runs scored: {', '.join(scores)}"]  # noqa: E731
    _, _, lines = cli._run_study(small(tiny_dir), out, tmp_path, title="rerun title", notes=[], verdict=verdict)
    assert lines == ["runs scored: base, specialist:math, dmt(k=0.125)"]
    html = (out / "report.html").read_text()
    assert "<title>my study</title>" in html and f"<li>{lines[0]}</li>" in html
    assert lines[0] not in buf.getvalue()  # printing it is the caller's (the demo's) part
    assert "min in all" in buf.getvalue() and f"models: {out / 'runs'}/" in buf.getvalue()
