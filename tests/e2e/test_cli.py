"""The CLI run as a user runs it: a separate process, checking output and exit codes."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))


def mixtune(*args, cwd=ROOT, check=True):
    env = os.environ | {"COLUMNS": "200", "NO_COLOR": "1"}
    out = subprocess.run([sys.executable, "-m", "mixtune.cli", *map(str, args)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"mixtune {' '.join(map(str, args))} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def test_help_lists_commands():
    out = mixtune("--help").stdout
    for cmd in ("demo", "data", "model", "list"):
        assert cmd in out
    assert "preview" in mixtune("data", "--help").stdout


def test_list_shows_abilities_and_levels():
    out = mixtune("list").stdout
    for name in ("math", "code", "general", "1-3 steps of + and -"):
        assert name in out


def test_list_shows_every_registry_by_name():
    from mixtune.data.scorers import SCORERS
    from mixtune.merge.methods import MERGE_METHODS
    from mixtune.strategy.mixing import MIXING_MODES
    from mixtune.strategy.stages import STRATEGIES
    from mixtune.train.methods import TUNERS

    out = mixtune("list").stdout
    for title, registry in (("Strategies", STRATEGIES), ("Tuning methods", TUNERS), ("Mixing modes", MIXING_MODES),
                            ("Merge methods", MERGE_METHODS), ("Scorers", SCORERS)):
        assert title in out
        assert all(f"│ {name} " in out for name in registry), title
    assert "LoRA (Hu et al., 2021, arXiv:2106.09685), Eq. 3:" in out  # "Eq." does not end the sentence
    only = mixtune("list", "mixing").stdout
    assert "aioli" in only and "Strategies" not in only and "math" not in only
    bad = mixtune("list", "mergers", check=False)
    assert bad.returncode == 2 and "'mergers'; choose one of abilities, strategies, methods" in bad.stderr


def test_every_example_recipe_previews():
    """In one process (the commands' own start-up is tested above): a subprocess per recipe cost 3 s each."""
    from typer.testing import CliRunner

    from mixtune.cli import app

    assert len(EXAMPLES) >= 1  # the check must see the shipped recipes
    for path in EXAMPLES:
        text = path.read_text()
        if "strategies:" in text or "specialists:" in text:  # a study: list its runs
            args, want = ["study", str(path), "--dry-run"], ["distinct stages to train"]
        else:
            args, want = ["data", "preview", str(path), "-n", "1"], ["packed into", "example 0"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (path, result.output)
        assert all(w in result.output for w in want), (path, result.output)


def test_preview_table_has_the_promised_counts():
    out = mixtune("data", "preview", "examples/preview.yaml", "-n", "0").stdout
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:]] for line in out.splitlines()
            if line.startswith("│")}
    # examples/preview.yaml: math count 500, code fraction 1/8 of 2000, general all 2000
    assert rows["math"][:3] == ["2,000", "500", "500"]
    assert rows["code"][:3] == ["2,000", "250", "250"]
    assert rows["general"][:3] == ["2,000", "2,000", "2,000"]
    assert rows["total"][1] == "2,750"


def test_overrides_change_the_recipe():
    out = mixtune("data", "preview", "examples/preview.yaml", "stages.0.mixture.sources.math.count=10", "-n", "0").stdout
    assert any(line.startswith("│ math") and "│    10 │" in line for line in out.splitlines())


def test_bad_recipe_is_one_clear_error_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  math: {builtin: math}\nstages:\n  - name: one\n    mixture:\n"
                   "      sources: {math: {count: 5000}}\n")
    out = mixtune("data", "preview", bad, check=False)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "error: stage 'one': mixture source 'math': 5000 examples asked but it has 1000" in out.stderr
    bad.write_text("sources:\n  math: {builtin: math}\nformat: {seq_len: 16}\n")
    out = mixtune("data", "preview", bad, check=False)
    assert out.returncode == 2 and "longer than seq_len = 16" in out.stderr


def test_generate_then_use_as_a_file_source(tmp_path):
    mixtune("data", "generate", "code", "-n", "7", "--split", "test", "--difficulty", "2", "-o", tmp_path / "c.jsonl")
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert len(lines) == 7 and json.loads(lines[0])["ability"] == "code"
    (tmp_path / "r.yaml").write_text("sources:\n  c: {path: c.jsonl}\n")
    out = mixtune("data", "preview", tmp_path / "r.yaml", "-n", "0", cwd=tmp_path).stdout
    assert any(line.startswith("│ c ") and "│         7 │" in line for line in out.splitlines())


def test_model_init_writes_a_loadable_folder_and_refuses_to_overwrite(tmp_path):
    out = mixtune("model", "init", tmp_path / "m", "--size", "tiny").stdout
    assert "1,115,264 parameters" in out
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").num_parameters() == 1_115_264
    again = mixtune("model", "init", tmp_path / "m", check=False)
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr


@pytest.mark.slow
def test_demo_quick_runs_the_whole_study_and_writes_the_report(tmp_path):
    out = mixtune("demo", "--quick", "--out", tmp_path / "demo").stdout
    demo = tmp_path / "demo"
    with open(demo / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    runs = {r["name"] for r in rows}
    assert runs == {"base", "specialist:math", "specialist:code", "specialist:general", "multi_task", "sequential",
                    "mixed_sequential", "dmt(k=0.03125)", "dmt(k=0.125)", "ties", "lines"}  # merges: the chosen points
    assert len(rows) == 11 * 3 and all(r["n"] == "20" for r in rows)
    assert "search chose ties(lambda=" in out and "search chose lines(lambda=" in out
    html = (demo / "report.html").read_text()
    # the bar chart, the loss curves, and the "why" section's two heat-maps (cosines, sign conflicts)
    assert "<h2>Gains and forgetting</h2>" in html and html.count("data:image/png;base64,") == 4
    assert "Merge-parameter search" in html
    why = html.split("Why: what fine-tuning changed", 1)[1]
    # the conjugate table: the seven runs the demo names, each ability under the frame
    assert why.count("<td>frame</td>") == 7 * 3 and "specialist:general" in why
    from mixtune.report.verdict import QUICK

    assert QUICK in out and "sequential forgets" not in out  # a quick run claims nothing
    assert QUICK in html
    again = mixtune("demo", "--quick", "--out", demo).stdout  # resumable: nothing left to train, merge or score
    assert "(0 to train)" in again and "merging" not in again and "evaluating" not in again


def test_train_dry_run_shows_exact_stage_counts_an_estimate_and_trains_nothing(tmp_path):
    out = mixtune("train", "examples/dmt.yaml", "--dry-run", "--out", tmp_path / "run").stdout
    # examples/dmt.yaml: the demo's pretraining (400 steps), then 2 epochs of 8-row batches per stage
    assert "stage 0-pretraining: 400 steps" in out
    assert "stage 1-specialists: 481 steps" in out and "stage 2-general+k=0.125: 204 steps" in out
    stage2 = out.split("stage 2-general")[1]
    rows = {line.split("│")[1].strip(): line for line in stage2.splitlines() if line.startswith("│")}
    assert "│   375 │" in rows["math"] and "│   375 │" in rows["code"] and "│ 3,000 │" in rows["general"]
    assert "echo" not in rows and "arithmetic" not in rows  # pretraining sources stay out of the strategy
    assert "name: dmt" in out and "k: 0.125" in out  # the resolved config is printed
    assert re.search(r"estimated time: \d+\.\d min for 1,085 steps", out)
    assert not (tmp_path / "run").exists()


def test_train_dry_run_says_what_an_objective_stage_samples(tmp_path):
    recipe = tmp_path / "rl.yaml"
    recipe.write_text("sources: {math: {builtin: math, n: 40}}\nformat: {seq_len: 128}\nstages:\n"
                      "  - {name: rl, mixture: {sources: {math: {}}}, epochs: 2, objective: {name: grpo, prompts: 4}}\n")
    out = mixtune("train", recipe, "--dry-run", "--no-estimate", "--out", tmp_path / "run").stdout
    # an objective stage's length counts its prompts: 2 epochs x 40 prompts / 4 a step
    assert "objective grpo: 40 prompts; 4 prompts x 8 samples a step; 20 optimizer steps" in out
    assert "packed into" not in out.split("stage rl")[1]


def test_train_runs_and_resumes_from_the_cli(tmp_path):
    args = ("train", "examples/dmt.yaml", "train.steps=3", "prefix.0.steps=3",
            "prefix.0.mixture.sources.arithmetic.count=50", *(f"sources.{s}.n=50" for s in ("echo", "math", "code",
                                                                                             "general")),
            "--out", tmp_path / "run")
    out = mixtune(*args).stdout
    assert "trained 3 stage(s)" in out
    for stage in ("0-pretraining", "1-specialists", "2-general+k=0.125"):
        assert (tmp_path / "run" / "stages" / stage / "model.safetensors").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()  # save_every: 0 keeps no resumable checkpoints
    again = mixtune(*args)
    assert "resuming from" in again.stderr and "(stage 2, step 3): every stage is trained" in again.stderr


def test_train_rejects_an_unknown_method_with_the_choices(tmp_path):
    out = mixtune("train", "examples/dmt.yaml", "train.method.name=lorra", "--dry-run", check=False)
    assert out.returncode == 2 and "override train.method" in out.stderr and "'full', 'hft', 'lift', 'lora'" in out.stderr
