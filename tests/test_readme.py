"""The README's commands are what CI and users run; keep them in step with the repository.

Every YAML block of the README and docs/ goes through the command it is written for, with
``--dry-run``, so a documented recipe that the code rejects fails here first.
"""

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_two_commands_and_ci_runs_the_test_one():
    demo, tests = readme_commands()
    assert demo.endswith("mixtune demo")
    assert tests.endswith("python -m pytest")
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_every_example_file_named_in_the_readme_exists_and_every_example_is_named():
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"(examples/[\w./-]+\.yaml)", text))
    for path in named:
        assert (ROOT / path).is_file(), path
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "examples").rglob("*.yaml")}
    assert len(shipped) >= 4 and shipped <= named, f"examples the README does not list: {sorted(shipped - named)}"


def test_the_quick_tour_puts_mixtune_on_the_path_first():
    text = (ROOT / "README.md").read_text()
    tour = re.search(r"## Quick tour.*?```bash\n(.+?)\n```", text, re.S).group(1).splitlines()
    assert tour[0] == ". .venv/bin/activate"  # the README's commands install into .venv, not onto PATH
    assert all(line.startswith("mixtune ") for line in tour[1:])


# -- every YAML block, through its command -----------------------------------------------------------

BASE_RECIPE = {"model": "builtin:tiny", "format": {"seq_len": 256},
               "sources": {s: {"builtin": s, "n": 2000} for s in ("math", "code", "general")}}


def yaml_blocks() -> list[tuple[str, int, str]]:
    """(file, line, text) of every ```yaml block in the README and docs/."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in re.finditer(r"^```ya?ml\n(.*?)^```", text, re.S | re.M):
            out.append((path.name, text[: m.start()].count("\n") + 1, m.group(1)))
    return out


def kind_of(data: dict) -> str:
    """Which command a block is written for; fragments are completed with a small recipe."""
    if "models" in data or "merge_method" in data or "slices" in data:
        return "merge"
    if set(data) == {"parameters"}:
        return "merge parameters fragment"
    if set(data) == {"tasks"}:
        return "tasks"
    if "strategies" in data or "specialists" in data:
        return "study"
    if set(data) == {"analysis"}:
        return "analysis fragment"
    if "sources" in data:
        return "recipe"
    if set(data) <= {"train", "run", "load", "stages", "strategy", "format", "mixture", "prefix", "seed"}:
        return "recipe fragment"
    if set(data) == {"method"}:
        return "method fragment"
    raise AssertionError(f"a YAML block of unknown kind (keys {sorted(data)}): teach this test what runs it")


def test_yaml_blocks_are_found():
    blocks = yaml_blocks()
    # README recipe, merging.md config, methods.md methods (4), training.md stages: at least these
    assert len(blocks) >= 7, blocks
    assert {name for name, _, _ in blocks} >= {"README.md", "merging.md", "methods.md", "training.md"}


@pytest.mark.parametrize("name,line,text", yaml_blocks(), ids=lambda v: v if isinstance(v, str) and v.endswith(".md")
                         else str(v) if isinstance(v, int) else "")
def test_every_yaml_block_of_the_docs_passes_dry_run(tmp_path, name, line, text, monkeypatch):
    from mixtune.cli import app

    monkeypatch.chdir(tmp_path)
    docs = list(yaml.safe_load_all(text))  # several: merges in one file (mergekit-multi)
    data = docs[0]
    kind = kind_of(data)
    if kind == "tasks":  # a task file: every data file it names gets a record, then it must load and render
        import json

        from mixtune.eval import parse_abilities
        from mixtune.eval.tasks import load_items

        record = {"question": "q", "answer": "0", "choices": ["a", "b"], "prompt": "def f():\n", "test": "",
                  "entry_point": "f"}
        for spec in data["tasks"].values():
            for key in ("path", "fewshot_path"):
                if key in spec:
                    (tmp_path / spec[key]).write_text(json.dumps(record) + "\n")
        (tmp_path / "block.yaml").write_text(text)
        names, tasks = parse_abilities(str(tmp_path / "block.yaml"))
        assert names == list(data["tasks"]) and all(load_items(tasks[n], 1) for n in names)
        return
    if kind == "merge parameters fragment":  # per-tensor parameters (gradients, filters): of a slerp
        kind, data = "merge", {"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
                               "dtype": "float32"} | data
        text = yaml.safe_dump(data)
    if kind == "merge":
        from mixtune.builtin import init_builtin

        docs = docs if len(docs) > 1 else [data]
        names = {d.get("name") for d in docs}
        inputs = [m for d in docs for m in [d.get("base_model"), *(e["model"] for e in d.get("models", [])),
                                           *(s["model"] for sl in d.get("slices", []) for s in sl["sources"])]]
        for i, m in enumerate(dict.fromkeys(inputs)):
            if m and m not in names and not (tmp_path / m).exists():
                init_builtin(tmp_path / m, size="tiny", seed=i)  # same architecture, different weights
        args = ["merge", "block.yaml", "--dry-run"] + (["-o", "out"] if len(docs) > 1 else [])
        (tmp_path / "block.yaml").write_text(text)
    else:
        if kind == "recipe":
            if not data.get("model", "builtin:").startswith("builtin:"):  # a model folder the block starts from
                from mixtune.builtin import init_builtin

                init_builtin(tmp_path / data["model"], size="tiny", seed=0)
            for src in data["sources"].values():
                if "path" in src:  # a file the block reads: give it one
                    (tmp_path / src["path"]).parent.mkdir(parents=True, exist_ok=True)
                    CliRunner().invoke(app, ["data", "generate", "general", "-n", "50", "-o", src["path"]],
                                       catch_exceptions=False)
            recipe = data
        elif kind in ("recipe fragment", "study"):  # a study block: completed with the recipe's sources
            recipe = BASE_RECIPE | data
        elif kind == "analysis fragment":  # a study's analysis section, of a study with the runs it names
            recipe = BASE_RECIPE | {"specialists": ["math", "code"], "strategies": [
                {"name": "sequential", "order": ["math", "code", "general"]}, {"name": "dmt", "k": [0.125]}]} | data
        else:
            recipe = BASE_RECIPE | {"train": data}
        (tmp_path / "block.yaml").write_text(yaml.safe_dump(recipe) if kind != "recipe" else text)
        args = (["study", "block.yaml", "--dry-run"] if kind in ("study", "analysis fragment") else
                ["train", "block.yaml", "--dry-run", "--no-estimate"])
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    assert result.exit_code == 0, f"{name}:{line} ({kind}): {result.exception or result.output}"


def test_the_error_the_readme_quotes_is_the_one_printed(tmp_path):
    """The README shows the error for its own recipe with ``count: -1``; that must be what the code says."""
    from mixtune.core import ConfigError
    from mixtune.recipe import load_recipe

    text = (ROOT / "README.md").read_text()
    recipe = re.search(r"## Recipes\n\n```yaml\n(.*?)```", text, re.S).group(1)
    quoted = re.search(r"e\.g\. for the recipe below with `count: -1`:\n\n```\n(.*?)\n```", text, re.S).group(1)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "run.yaml").write_text(recipe.replace("math: {count: 500}", "math: {count: -1}"))
    with pytest.raises(ConfigError) as e:
        load_recipe(tmp_path / "run.yaml")
    assert quoted == "error: " + str(e.value).replace(str(tmp_path / "run.yaml"), "run.yaml")


def test_the_bad_record_error_the_readme_quotes_is_the_one_printed(tmp_path):
    from mixtune.core import DataError
    from mixtune.data.sources import SourceConfig, load_source

    text = (ROOT / "README.md").read_text()
    quoted = re.search(r"stops with its file and line \(or row\) and what was expected, e\.g\.\n`(.*?) \.\.\.`", text,
                       re.S).group(1)
    good = '{"prompt": "a", "completion": "b"}\n'
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.jsonl").write_text(good * 202 + '{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataError) as e:
        load_source("mine", SourceConfig(path=tmp_path / "data" / "mine.jsonl"))
    assert str(e.value).replace(str(tmp_path) + "/", "").startswith(quoted)
