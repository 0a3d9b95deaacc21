"""What a new user meets first: help, version, errors for bad outputs and inputs, file modes, logs.

These run ``mixtune.cli.main`` in-process (as the ``mixtune`` script does), so each error is checked
exactly as printed: exit code 2, one ``error:`` line, no traceback, nothing written.
"""

import os
import stat
import sys
from pathlib import Path

import pytest

from mixtune.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["mixtune", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_version(capsys, monkeypatch):
    from mixtune import __version__

    code, out, _ = run(capsys, monkeypatch, "--version")
    assert code == 0 and out.strip() == f"mixtune {__version__}"


@pytest.mark.parametrize("command", [["train"], ["study"], ["eval"], ["data", "preview"], ["data", "generate"],
                                     ["model", "init"], ["merge"], ["soup"], ["report"], ["demo"], ["list"]])
def test_help_has_no_type_placeholders_or_braces(capsys, monkeypatch, command):
    code, out, _ = run(capsys, monkeypatch, *command, "--help")
    assert code == 0
    assert "<bool>" not in out and "<path>" not in out and "<list[str]>" not in out, out
    usage = out.splitlines()[0]
    assert usage.startswith(f"Usage: mixtune {' '.join(command)} [OPTIONS]") and "{" not in usage, usage


def test_train_usage_reads_as_click_writes_it(capsys, monkeypatch):
    _, out, _ = run(capsys, monkeypatch, "train", "--help")
    assert out.splitlines()[0] == "Usage: mixtune train [OPTIONS] RECIPE [KEY=VALUE]..."


def test_out_that_is_a_file_is_one_error_and_nothing_is_written(capsys, monkeypatch, tmp_path):
    target = tmp_path / "taken"
    target.write_text("x")
    for cmd in (["train", ROOT / "examples/preview.yaml", "--out", target],
                ["study", ROOT / "examples/methods.yaml", "--out", target], ["demo", "--out", target],
                ["eval", ROOT / "nowhere", "--out", target]):
        line = one_error(*run(capsys, monkeypatch, *cmd)[::2])
        assert line == f"error: --out {target}: exists and is not a folder; give a folder (new or existing)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_out_without_write_permission_is_one_error(capsys, monkeypatch, tmp_path):
    # /sys refuses new folders even to root (CI runs as root, where a chmod-ed folder would not stop it)
    for where in ([Path("/sys/mixtune-test/out")] + ([tmp_path / "ro" / "out"] if os.geteuid() != 0 else [])):
        if where.parent.name == "ro":
            where.parent.mkdir()
            where.parent.chmod(0o555)
        line = one_error(*run(capsys, monkeypatch, "train", ROOT / "examples/preview.yaml", "--out", where)[::2])
        assert line.startswith(f"error: --out {where}: cannot create or write the folder ") and "ermission" in line \
            or "not permitted" in line, line


def test_eval_n_zero_is_a_usage_error(capsys, monkeypatch, tiny_dir):
    code, _, err = run(capsys, monkeypatch, "eval", tiny_dir, "--n", "0")
    assert code == 2 and "Traceback" not in err
    assert "Error: Invalid value for '--n': Input should be greater than or equal to 1" in err


def test_evaluate_refuses_n_zero(tiny_dir):
    from mixtune.core import ConfigError
    from mixtune.eval import evaluate, load_for_eval

    model, tok = load_for_eval(tiny_dir)
    with pytest.raises(ConfigError, match="needs n >= 1"):
        evaluate(model, tok, ["math"], n=0)


def test_a_misspelt_builtin_is_caught_at_its_line_before_anything_is_written(capsys, monkeypatch, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sources:\n  math: {builtin: maths}\n  mine: {path: missing.jsonl}\ntrian: {steps: 3}\n")
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, monkeypatch, "train", recipe, "--out", out_dir)
    assert code == 2 and out == "" and "Traceback" not in err
    # every problem together, each with its line
    assert f"{recipe}:2 sources.math.builtin = 'maths': unknown ability 'maths'. Did you mean: math?" in err
    assert f"{recipe}:3 sources.mine.path = 'missing.jsonl': no such file or folder" in err
    assert f"{recipe}:4 trian = {{'steps': 3}}: unknown key; did you mean 'train'?" in err
    assert "docs/recipes.md" in err and "mixtune --help" not in err
    assert not out_dir.exists()
    code, out, err = run(capsys, monkeypatch, "train", recipe, "--dry-run")  # the dry run prints nothing first
    assert code == 2 and out == ""


def test_bad_data_is_found_before_the_run_writes_anything(capsys, monkeypatch, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "1", "completion": "2"}\n{"nothing": 1}\n')
    (tmp_path / "b.jsonl").write_text('{"prompt": "1"\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sources:\n  a: {path: a.jsonl}\n  b: {path: b.jsonl}\n")
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, monkeypatch, "train", recipe, "--out", out_dir)
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: 2 sources cannot be used:\n")  # both files' problems, together
    assert f"{tmp_path / 'a.jsonl'}:2" in err and f"{tmp_path / 'b.jsonl'}:1" in err
    assert not (out_dir / "base").exists()


def test_outputs_follow_the_umask(capsys, monkeypatch, tmp_path):
    from mixtune.core import atomic_dir, atomic_write_text

    old = os.umask(0o022)
    try:
        mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
        assert mode(atomic_write_text(tmp_path / "a.txt", "x")) == 0o644
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("x")
        assert mode(tmp_path / "d") == 0o755
        code, _, _ = run(capsys, monkeypatch, "model", "init", tmp_path / "m")
        assert code == 0 and mode(tmp_path / "m") == 0o755
        assert {mode(f) for f in (tmp_path / "m").iterdir()} == {0o644}
        os.umask(0o077)
        assert mode(atomic_write_text(tmp_path / "b.txt", "x")) == 0o600  # a private umask is kept too
    finally:
        os.umask(old)


def test_output_to_a_file_is_not_wrapped(capsys, monkeypatch, tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "math-problems-for-the-tour.jsonl"
    code, out, _ = run(capsys, monkeypatch, "data", "generate", "math", "-n", "3", "-o", deep)
    assert code == 0
    assert out.strip() == f"wrote 3 math train problems (difficulty 1, seed 0) to {deep}"  # one greppable line


def test_eval_table_names_the_model_on_a_line_of_its_own(capsys, monkeypatch, tiny_dir):
    code, out, _ = run(capsys, monkeypatch, "eval", tiny_dir, "--abilities", "math", "--n", "2")
    assert code == 0
    assert out.splitlines()[0] == f"{tiny_dir} on held-out problems (difficulty 1, seed 0):"


def test_a_one_stage_recipe_with_a_top_level_mixture(tmp_path):
    from mixtune.recipe import load_recipe

    (tmp_path / "r.yaml").write_text("sources:\n  math: {builtin: math, n: 100}\n  code: {builtin: code, n: 100}\n"
                                     "mixture:\n  sources: {math: {count: 30}, code: {}}\n")
    cfg, _ = load_recipe(tmp_path / "r.yaml")
    (stage,) = cfg.resolved_stages()
    assert stage.name == "mixture" and stage.mixture.sources["math"].count == 30
    (tmp_path / "r.yaml").write_text("sources:\n  math: {builtin: math}\nmixture:\n  sources: {math: {}}\n"
                                     "strategy: {name: multi_task}\n")
    from mixtune.core import ConfigError

    with pytest.raises(ConfigError, match="give one of `strategy`, `stages` or `mixture`, not strategy and mixture"):
        load_recipe(tmp_path / "r.yaml")


def test_prefix_stages_come_first_and_their_sources_stay_out_of_the_strategy():
    from mixtune.recipe import load_recipe

    cfg, _ = load_recipe(ROOT / "examples/dmt.yaml")
    stages = cfg.resolved_stages()
    assert [s.name for s in stages] == ["0-pretraining", "1-specialists", "2-general+k=0.125"]
    assert set(stages[1].mixture.sources) == {"math", "code"}  # echo and arithmetic only pretrain
    assert set(stages[2].mixture.sources) == {"general", "math", "code"}
