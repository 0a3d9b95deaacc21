"""Several merges in one file (mergekit-multi): mergekit 0.1.5's own ``mergekit-multi`` and mixtune run
the example of mergekit's docs/multimerge.md on local tiny checkpoints and give the same tensors, bit
for bit; the errors name the document and the field; a rerun keeps what is up to date.
"""

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from mixtune.cli import app
from mixtune.core import CheckpointError, ConfigError
from mixtune.merge import load_merge_config
from mixtune.merge import multi
from mixtune.merge.multi import load_multi_config, run_multi

from tests.merge.test_mergekit_parity import assert_same, perturbed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_dir):
    return perturbed(tiny_dir, tmp_path_factory.mktemp("multi"), torch.float32)


def example(root, dtype):
    """mergekit's docs/multimerge.md example, its models replaced by local ones, and dare_ties (whose masks
    mergekit draws from torch's global generator, so no two runs agree) by ties; every document in ``dtype``."""
    docs = [
        {"name": "first-merge", "merge_method": "linear", "dtype": dtype, "parameters": {"weight": 0.5},
         "models": [{"model": str(root / "base")}, {"model": str(root / "ft0")}]},
        {"name": "second-merge", "merge_method": "slerp", "dtype": dtype, "base_model": "first-merge",
         "models": [{"model": str(root / "ft1")}], "parameters": {"t": 0.5}},
        {"merge_method": "ties", "dtype": dtype, "base_model": str(root / "base"),
         "models": [{"model": "second-merge", "parameters": {"density": 0.6, "weight": 0.5}},
                    {"model": str(root / "ft2"), "parameters": {"density": 0.8, "weight": 0.5}}]},
    ]
    return yaml.safe_dump_all(docs, sort_keys=False)


def write(folder, text, name="multi.yaml"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def tensors(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_tensors_as_mergekit_multi(checkpoints, tmp_path, dtype):
    from mergekit.scripts.multimerge import main

    path = write(tmp_path, example(checkpoints, dtype))
    main.main([str(path), "--intermediate-dir", str(tmp_path / "mk-parts"), "--out-path", str(tmp_path / "mk"),
               "--no-copy-tokenizer", "--quiet"], standalone_mode=False)
    steps = load_multi_config(path, tmp_path / "mx")
    assert [(st.name, st.reads) for st in steps] == [("first-merge", ()), ("second-merge", ("first-merge",)),
                                                     (None, ("second-merge",))]
    assert steps[1].cfg.base_model == (tmp_path / "mx.parts" / "first-merge").absolute()
    run_multi(steps)
    for name in ("first-merge", "second-merge"):
        assert_same(tensors(tmp_path / "mk-parts" / name), tensors(tmp_path / "mx.parts" / name))
    theirs, ours = tensors(tmp_path / "mk"), tensors(tmp_path / "mx")
    assert all(t.dtype == getattr(torch, dtype) for t in ours.values())
    assert_same(theirs, ours)


def test_documents_in_mixtune_form_any_order_and_all_named(checkpoints, tmp_path):
    # the final document first, its input last: run in dependency order; mixtune's form refers by name too
    text = yaml.safe_dump_all([
        {"name": "c", "method": "linear", "models": [{"model": "b", "weight": 1.0}, {"model": "a", "weight": 1.0}]},
        {"name": "a", "method": "linear", "models": [{"model": str(checkpoints / "ft0"), "weight": 1.0},
                                                     {"model": str(checkpoints / "ft1"), "weight": 1.0}]},
        {"name": "b", "merge_method": "linear", "parameters": {"weight": 1.0},
         "models": [{"model": "a"}, {"model": str(checkpoints / "ft2")}]},
    ])
    steps = load_multi_config(write(tmp_path, text), tmp_path / "all")
    assert [st.name for st in steps] == ["a", "b", "c"]
    assert [st.out for st in steps] == [tmp_path / "all" / n for n in "abc"]  # every document named: OUT/NAME
    run_multi(steps)
    key = "model.layers.1.self_attn.q_proj.weight"
    ft = [tensors(checkpoints / f"ft{i}")[key] for i in range(3)]
    # a = (ft0 + ft1) / 2; b = (a + ft2) / 2; c = (b + a) / 2 = 3/8 ft0 + 3/8 ft1 + 1/4 ft2
    torch.testing.assert_close(tensors(tmp_path / "all" / "c")[key], 0.375 * ft[0] + 0.375 * ft[1] + 0.25 * ft[2])


def test_a_rerun_keeps_what_is_up_to_date(checkpoints, tmp_path, monkeypatch):
    path = write(tmp_path, example(checkpoints, "float32"))
    calls = []
    real = multi.merge
    monkeypatch.setattr(multi, "merge", lambda cfg, out, **kw: calls.append(out.name) or real(cfg, out, **kw))
    run_multi(load_multi_config(path, tmp_path / "out"))
    assert calls == ["first-merge", "second-merge", "out"]
    first = tmp_path / "out.parts" / "first-merge" / "model.safetensors"
    stamp = first.stat().st_mtime_ns
    # an interrupted run: the final is missing; the intermediates are kept, only the final is merged
    shutil.rmtree(tmp_path / "out")
    calls.clear()
    kept = []
    run_multi(load_multi_config(path, tmp_path / "out"), say=kept.append)
    assert calls == ["out"] and first.stat().st_mtime_ns == stamp
    assert kept == [f"document 1 (first-merge): {tmp_path / 'out.parts' / 'first-merge'} is up to date, kept",
                    f"document 2 (second-merge): {tmp_path / 'out.parts' / 'second-merge'} is up to date, kept"]
    # all up to date: nothing is merged
    calls.clear()
    run_multi(load_multi_config(path, tmp_path / "out"))
    assert calls == []
    # the first document changes: it and what reads it are merged again; the final needs --overwrite
    path.write_text(path.read_text().replace("weight: 0.5\n", "weight: 0.25\n", 1))
    with pytest.raises(CheckpointError, match=r"out already exists \(document 3 \(unnamed: the final merge\): "
                                              r"'second-merge' is merged again\)"):
        run_multi(load_multi_config(path, tmp_path / "out"))
    assert calls == []  # refused before anything was merged
    reasons = []
    run_multi(load_multi_config(path, tmp_path / "out", intermediate_dir=tmp_path / "out.parts"),
              overwrite=True, on_start=lambda st, why: reasons.append(why))
    assert calls == ["first-merge", "second-merge", "out"] and first.stat().st_mtime_ns != stamp
    calls.clear()
    path.write_text(path.read_text().replace("\n  t: 0.5\n", "\n  t: 0.25\n"))
    with pytest.raises(CheckpointError):
        run_multi(load_multi_config(path, tmp_path / "out"))
    shutil.rmtree(tmp_path / "out")
    run_multi(load_multi_config(path, tmp_path / "out"), on_start=lambda st, why: reasons.append(why))
    assert calls == ["second-merge", "out"] and reasons[-2:] == ["its document changed", ""]


def errors(tmp_path, docs, **kw):
    path = write(tmp_path, yaml.safe_dump_all(docs, sort_keys=False))
    with pytest.raises(ConfigError) as e:
        load_multi_config(path, tmp_path / "out", **kw)
    return str(e.value)


def linear(*models, name=None):
    doc = {"name": name} if name else {}
    return doc | {"merge_method": "linear", "parameters": {"weight": 1.0}, "models": [{"model": m} for m in models]}


def test_errors_name_the_document_and_the_field(checkpoints, tmp_path):
    ft0, ft1 = str(checkpoints / "ft0"), str(checkpoints / "ft1")
    msg = errors(tmp_path, [linear(ft0, ft1, name="first-merge"), linear("frist-merge", ft1)])
    assert msg.startswith(f"{tmp_path / 'multi.yaml'}:")
    assert ("document 2 (unnamed: the final merge): models[0].model 'frist-merge' is neither a path from the "
            "config's folder nor the name of a merge in this file (names: first-merge); did you mean 'first-merge'?"
            in msg)
    msg = errors(tmp_path, [linear("b", ft0, name="a"), linear(ft1, "a", name="b"), linear("a", ft1)])
    assert msg == (f"{tmp_path / 'multi.yaml'}: the merges read each other in a cycle: document 1 (a) reads 'b' at "
                   "models[0].model (line 6), document 2 (b) reads 'a' at models[1].model (line 15); a merge cannot "
                   "take its own output")
    msg = errors(tmp_path, [linear("a", ft0, name="a")])
    assert "document 1 (a) reads 'a' at models[0].model" in msg
    msg = errors(tmp_path, [linear(ft0, ft1, name="a"), linear(ft0, ft1, name="a"), linear("a", ft1)])
    assert msg.endswith(":9: document 2: name 'a' is document 1's too; give each merge its own name")
    msg = errors(tmp_path, [linear(ft0, ft1, name="a"), linear("a", ft1), linear("a", ft0)])
    assert "document 3: has no name, nor has document 2: only one document (the final merge) may be unnamed" in msg
    # a name that is also a folder beside the config (checkpoints/ft0 beside checkpoints/multi.yaml)
    msg = errors(checkpoints, [linear(ft0, ft1, name="ft0"), linear("ft0", ft1)])
    assert (f"document 1 (ft0): name 'ft0' is also {checkpoints / 'ft0'}, a path from the config's folder, so a "
            "reference to it would be ambiguous; rename the merge") in msg
    msg = errors(tmp_path, [linear(ft0, ft1, name="x/y"), linear("x/y", ft1)])
    assert "document 1: name 'x/y': expected a plain folder name" in msg
    # a document's own config error names it, in either form
    msg = errors(tmp_path, [linear(ft0, ft1, name="a") | {"modules": {}}, linear("a", ft1)])
    assert "document 1 (a): mergekit field 'modules' is not supported" in msg
    msg = errors(tmp_path, [{"name": "a", "method": "linear", "models": [{"model": ft0, "weigth": 1}]},
                            linear("a", ft1)])
    assert msg.startswith(f"{tmp_path / 'multi.yaml'}: document 1 (a): 1 problem") and ":5 models.0.weigth" in msg
    path = write(tmp_path, yaml.safe_dump_all([linear(ft0, ft1, name="a"), linear("a", ft1)]))
    with pytest.raises(ConfigError, match=r"document 2 \(unnamed: the final merge\) is the final merge: give the "
                                          r"output folder \(--out DIR\)"):
        load_multi_config(path)
    # read as one config, a multi-document file says where to go
    with pytest.raises(ConfigError, match="holds several YAML documents .*mixtune.merge.multi.load_multi_config"):
        load_merge_config(path)


def test_cli_dry_run_checks_what_exists_and_names_what_is_pending(checkpoints, tmp_path):
    path = write(tmp_path, example(checkpoints, "float32"))
    runner = CliRunner()
    got = runner.invoke(app, ["merge", str(path), "-o", str(tmp_path / "out"), "--dry-run"], catch_exceptions=False)
    assert got.exit_code == 0, got.output
    lines = [" ".join(line.split()) for line in got.output.strip().splitlines()]
    n = len(tensors(checkpoints / "base"))
    first = tmp_path / "out.parts" / "first-merge"
    assert lines[0] == f"document 1 (first-merge): linear -> {first} (to merge); {n} tensors checked"
    assert lines[1].startswith("document 2 (second-merge): slerp -> ") and lines[1].endswith(
        "(to merge); waits for first-merge: its config and existing inputs checked, the rest once made")
    assert lines[2].startswith("document 3 (unnamed: the final merge): ties -> ")
    assert "waits for second-merge" in lines[2]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.parts").exists()
    # a pending document's existing inputs are still opened: a folder without weights stops the dry run
    (tmp_path / "empty").mkdir()
    path.write_text(example(checkpoints, "float32").replace(str(checkpoints / "ft2"), str(tmp_path / "empty")))
    got = runner.invoke(app, ["merge", str(path), "-o", str(tmp_path / "out"), "--dry-run"])
    assert isinstance(got.exception, CheckpointError)
    assert str(got.exception).startswith(f"model {tmp_path / 'empty'}: no model.safetensors")
    path.write_text(example(checkpoints, "float32"))
    got = runner.invoke(app, ["merge", str(path), "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert got.exit_code == 0, got.output
    assert "document 1 (first-merge): linear ->" in got.output and (tmp_path / "out" / "merge.yaml").exists()
    got = runner.invoke(app, ["merge", str(path), "-o", str(tmp_path / "out"), "--dry-run"], catch_exceptions=False)
    assert got.output.count("up to date, kept") == 3
