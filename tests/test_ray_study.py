"""Issue #20 item 1: studies on Ray. The one orchestrator (mixtune.graph) hands each ready node to a
local Ray cluster (``ray.init(num_cpus=2)``) as a task with its kind's resources; the results are the
local runner's, entry by entry, a killed or failed study resumes as locally, and a node that fails
is retried once, then reported with its label and the file holding its output."""

import json
import os
import shutil
import sqlite3
import sys

import pytest
import ray
import torch
from typer.testing import CliRunner

from mixtune.core import ConfigError, dump_config
from mixtune.graph import ATTEMPT, Node, NodeError, RayOptions, check_graph, ray_options, run_graph
from mixtune.study import Study, expand, stage_keys
from tests.test_study import config

# the failing graph's node functions live here, and Ray workers cannot import this test module
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for the module; run_graph uses the connection it finds."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


def store(folder) -> dict[str, list[tuple]]:
    """Every table of a study's results.sqlite but its metadata and timings, rows sorted."""
    db = sqlite3.connect(folder / "results.sqlite")
    tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'") if t != "meta"]
    out = {}
    for t in tables:
        cols = [c[1] for c in db.execute(f"PRAGMA table_info({t})") if c[1] not in ("seconds", "peak_rss_mb")]
        out[t] = sorted(db.execute(f"SELECT {', '.join(cols)} FROM {t}").fetchall(), key=repr)
    return out


def test_a_study_on_ray_gives_the_local_runners_results_and_resumes(tiny_dir, tmp_path, cluster):
    from safetensors.torch import load_file

    from mixtune.cli import app

    cfg = config(tiny_dir, specialists=["math"], strategies=[], eval={"n": 2, "abilities": ["math"]})
    local = Study(cfg, tmp_path / "local", progress=False, log=lambda m: None)
    local.run()
    recipe = tmp_path / "study.yaml"
    recipe.write_text(dump_config(cfg))
    # the command a user types, `--ray` without an address (it finds the cluster this process started)
    result = CliRunner().invoke(app, ["study", str(recipe), "--out", str(tmp_path / "ray"), "--ray"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "graph: on Ray (1 Ray node: 2 CPUs, 0 GPUs" in result.output
    on_ray = Study(cfg, tmp_path / "ray", progress=False, log=lambda m: None)
    nodes = list(check_graph(on_ray.graph()).values())  # distinct: the runs share the prefix's node
    assert result.output.count("graph: starting") == len(nodes) == 4  # 2 stages, 2 evaluations: each a Ray task

    theirs, mine = store(tmp_path / "local"), store(tmp_path / "ray")
    assert list(mine) == list(theirs)
    assert len(mine["evals"]) == 2 and len(mine["items"]) == 4 and len(mine["losses"]) > 0
    for table in theirs:
        assert mine[table] == theirs[table], table
    keys = sorted({k for r in expand(cfg) for k in stage_keys(cfg, r)})
    for key in keys:
        a, b = (load_file(s.model_dir(key) / "model.safetensors") for s in (local, on_ray))
        assert all(torch.equal(v, b[k]) for k, v in a.items()), key
    for node in nodes:  # each node's output in its log, from a Ray worker process
        text = (tmp_path / "ray" / "logs" / f"{node.key}.log").read_text()
        header = [line for line in text.splitlines() if line.startswith(ATTEMPT)]
        assert len(header) == 1 and f"process {os.getpid()}," not in header[0], node.key
        assert ("training stage" if node.kind == "train" else "evaluating math") in text, node.key

    # killed before a specialist was exported: the rerun on Ray runs that node alone, to the same weights
    last = stage_keys(cfg, expand(cfg)[1])[-1]
    shutil.rmtree(on_ray.model_dir(last))
    log: list[str] = []
    Study(cfg, tmp_path / "ray", progress=False, log=log.append, ray=RayOptions()).run()
    assert [m for m in log if m.startswith("graph: starting")] == [
        f"graph: starting {expand(cfg)[1].id}: stage 2/2 1-math (1 given to Ray, queued or running; output in "
        f"{(tmp_path / 'ray' / 'logs' / last).resolve()}.log)"]
    a, b = (load_file(s.model_dir(last) / "model.safetensors") for s in (local, on_ray))
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert store(tmp_path / "ray") == theirs
    log.clear()
    Study(cfg, tmp_path / "ray", progress=False, log=log.append, ray=RayOptions()).run()  # a rerun does nothing
    assert not any(m.startswith("graph:") for m in log)


def open_folder(folder: str) -> None:
    os.environ["MIXTUNE_TEST_GRAPH"] = folder  # the process's: shared by the node function, however pickled


def node_that_may_fail(key: str) -> None:
    """``b`` fails until ``b.fixed`` exists; ``c`` fails on its first attempt only; others write ``KEY.json``."""
    from pathlib import Path

    out = Path(os.environ["MIXTUNE_TEST_GRAPH"])
    print(f"running {key}")
    if key == "b" and not (out / "b.fixed").exists():
        raise ValueError("b is broken")
    if key == "c" and not (out / "c.tried").exists():
        (out / "c.tried").write_text("")
        raise RuntimeError("c fails on its first attempt")
    (out / f"{key}.json").write_text(json.dumps({"pid": os.getpid(), "threads": torch.get_num_threads()}))


def test_a_failing_node_is_retried_once_then_reported_with_its_log_and_the_graph_resumes(tmp_path, cluster):
    nodes = [Node("a", "train", (), "stage a"), Node("b", "train", ("a",), "stage b"),
             Node("c", "eval", ("a",), "eval c"), Node("d", "merge", ("b", "c"), "merge d")]
    options = ray_options(None, ["train.cpus=2"])

    def go(log: list[str]) -> list[str]:
        return run_graph(nodes, done=lambda n: (tmp_path / f"{n.key}.json").exists(), execute=None,
                         worker=node_that_may_fail, init=(open_folder, (str(tmp_path),)), log=log.append,
                         ray=options, logs=tmp_path / "logs")

    log: list[str] = []
    with pytest.raises(NodeError) as failed:
        go(log)
    message = str(failed.value)
    assert message == (f"graph: stage b failed (2 attempts; Ray retries a node once): ValueError: b is broken; "
                       f"its output: {tmp_path / 'logs' / 'b.log'}")
    text = (tmp_path / "logs" / "b.log").read_text()
    assert text.count(ATTEMPT) == 2 and text.count("running b") == 2 and text.count("ValueError: b is broken") == 2
    # what else was running finishes (c, after its retry); what needs the failed node never starts
    assert (tmp_path / "c.json").exists() and (tmp_path / "logs" / "c.log").read_text().count(ATTEMPT) == 2
    assert not (tmp_path / "d.json").exists() and not any("merge d" in m for m in log)
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["pid"] != os.getpid() and a["threads"] == 2  # a Ray worker; its kind's CPUs as torch threads

    (tmp_path / "b.fixed").write_text("")
    log.clear()
    assert go(log) == ["b", "d"]  # resumed: the finished nodes are not run again
    assert (tmp_path / "logs" / "b.log").read_text().count(ATTEMPT) == 1  # this run's attempt only


def test_what_no_ray_node_has_is_refused_before_anything_runs(tmp_path, cluster):
    nodes = [Node("a", "train", (), "stage a")]
    with pytest.raises(ConfigError, match=r"^--ray-resources train\.gpus: train nodes ask for 1 CPUs, 1 GPUs, 0\.0 GiB "
                                          r"memory, and no Ray node has that much \(2 CPUs, 0 GPUs"):
        run_graph(nodes, done=lambda n: False, execute=None, worker=node_that_may_fail,
                  init=(open_folder, (str(tmp_path),)), log=lambda m: None,
                  ray=ray_options("auto", ["train.gpus=1"]), logs=tmp_path / "logs")
    assert not (tmp_path / "logs").exists()


def test_ray_options_are_checked_with_the_place_named():
    assert ray_options("auto", ["merge.memory_gb=8"]).merge.model_dump() == {"cpus": 1, "gpus": 0, "memory_gb": 8}
    assert ray_options(None).train.gpus is None  # one GPU when the cluster has one
    with pytest.raises(ConfigError, match=r"--ray train\.steps=5: expected a Ray address"):
        ray_options("train.steps=5")
    with pytest.raises(ConfigError, match=r"override train\.gpu = 1: unknown key; did you mean 'gpus'"):
        ray_options(None, ["train.gpu=1"])
    with pytest.raises(ConfigError, match="give the address as --ray ADDRESS"):
        ray_options(None, ["address=auto"])
