"""The one orchestrator's graph: dependency order, skipping what is done, parallel local processes."""

import json
import os
from pathlib import Path

import pytest

from mixtune.core import ConfigError
from mixtune.graph import Node, check_graph, run_graph


def test_nodes_run_after_what_they_need_once_each_and_done_ones_are_skipped():
    nodes = [Node("eval-b", "eval", ("b",)), Node("b", "train", ("a",)), Node("a", "train"),
             Node("b", "train", ("a",)), Node("m", "merge", ("a", "b"))]
    assert list(check_graph(nodes)) == ["a", "b", "eval-b", "m"]
    ran: list[str] = []
    assert run_graph(nodes, done=lambda n: n.key == "a", execute=lambda n: ran.append(n.key)) == ["b", "eval-b", "m"]
    assert ran == ["b", "eval-b", "m"]
    assert run_graph(nodes, done=lambda n: True, execute=lambda n: ran.append(n.key)) == []


def test_a_malformed_graph_is_refused_with_the_node_named():
    with pytest.raises(ConfigError, match="node b needs x, which is not in the graph"):
        check_graph([Node("b", "train", ("x",))])
    with pytest.raises(ConfigError, match="depends on itself"):
        check_graph([Node("a", "train", ("b",)), Node("b", "train", ("a",))])
    with pytest.raises(ConfigError, match="node a is given twice with different inputs"):
        check_graph([Node("a", "train"), Node("a", "train", ("b",)), Node("b", "train")])


FOLDER: dict[str, Path] = {}


def open_folder(folder: str) -> None:
    FOLDER["out"] = Path(folder)


def write_node(key: str) -> None:
    """A worker's node: record which inputs were there when it started, and its process."""
    out = FOLDER["out"]
    seen = sorted(p.stem for p in out.glob("*.json"))
    (out / f"{key}.json").write_text(json.dumps({"seen": seen, "pid": os.getpid()}))


def test_parallel_nodes_run_in_other_processes_after_their_inputs(tmp_path):
    nodes = [Node("a", "train"), Node("b", "train", ("a",)), Node("c", "train", ("a",)), Node("d", "merge", ("b", "c"))]
    ran = run_graph(nodes, done=lambda n: (tmp_path / f"{n.key}.json").exists(), execute=None, jobs=2,
                    worker=write_node, init=(open_folder, (str(tmp_path),)), log=lambda m: None)
    assert sorted(ran) == ["a", "b", "c", "d"] and ran[0] == "a" and ran[-1] == "d"
    got = {k: json.loads((tmp_path / f"{k}.json").read_text()) for k in "abcd"}
    assert "a" in got["b"]["seen"] and "a" in got["c"]["seen"] and {"b", "c"} <= set(got["d"]["seen"])
    assert all(g["pid"] != os.getpid() for g in got.values())
    # a rerun does nothing
    assert run_graph(nodes, done=lambda n: (tmp_path / f"{n.key}.json").exists(), execute=None, jobs=2,
                     worker=write_node, init=(open_folder, (str(tmp_path),))) == []
