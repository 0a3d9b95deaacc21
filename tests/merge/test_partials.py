"""Partial folders of interrupted merges: a killed merge's is removed by the next, a running one's kept."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from mixtune.cli import app
from mixtune.merge import load_merge_config, merge

# A merge in a process of its own: "die" ends it abruptly after the first tensor is written (as a
# kill would: no clean-up runs); "wait" holds it mid-write until the file `go` appears.
WORKER = """
import os, sys, time
from pathlib import Path
from mixtune.merge import load_merge_config, merge
recipe, out, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
calls = []
def progress(key):
    calls.append(key)
    if len(calls) == 2 and mode == "die":
        os._exit(9)
    if mode == "wait":
        (recipe.parent / "started").touch()
        deadline = time.time() + 60
        while not (recipe.parent / "go").exists() and time.time() < deadline:
            time.sleep(0.05)
merge(load_merge_config(recipe), out, base_dir=recipe.parent, progress=progress)
"""


def write_model(folder, tensors):
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["X"]}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture
def recipe(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(64, 64, generator=g), "b.weight": torch.randn(64, 64, generator=g)}
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "ft", {k: v + 0.1 for k, v in base.items()})
    path = tmp_path / "merge.yaml"
    path.write_text("method: task_arithmetic\nbase_model: base\nmodels:\n  - model: ft\n")
    return path


def worker(recipe, out, mode):
    return subprocess.Popen([sys.executable, "-c", WORKER, str(recipe), str(out), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def partials(out):
    return sorted(out.parent.glob(f".{out.name}.*.partial"))


def test_a_killed_merges_partial_is_removed_by_the_next_merge_and_reported(recipe, tmp_path):
    out = tmp_path / "merged"
    killed = worker(recipe, out, "die")
    assert killed.wait(timeout=120) == 9, killed.stdout.read()
    [stale] = partials(out)
    assert (stale / "model.safetensors").exists() and not out.exists()  # half a model, left behind
    lines = []
    merge(load_merge_config(recipe), out, base_dir=recipe.parent, notice=lines.append)
    assert not stale.exists() and partials(out) == []
    assert len(lines) == 1 and lines[0].startswith(f"removed stale partial folder {stale} (")
    assert lines[0].split(f"{stale} (")[1].startswith(("0.0 MiB)", "0.1 MiB)"))  # about 16 KiB of 32 written
    assert "from an interrupted merge" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "merge.yaml", "model.safetensors",
                                                     "tokenizer.json"]  # the owner record does not ship


def test_the_cli_says_which_stale_partial_it_removed(recipe, tmp_path):
    out = tmp_path / "merged"
    assert worker(recipe, out, "die").wait(timeout=120) == 9
    [stale] = partials(out)
    result = CliRunner().invoke(app, ["merge", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the console may wrap a long line
    assert f"removed stale partial folder {stale} (" in text and "from an interrupted merge" in text
    assert not stale.exists() and (out / "model.safetensors").exists()


def test_a_running_merges_partial_is_kept(recipe, tmp_path):
    out = tmp_path / "merged"
    running = worker(recipe, out, "wait")
    try:
        deadline = time.time() + 120
        while not (tmp_path / "started").exists() and running.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        [live] = partials(out)
        lines = []
        merge(load_merge_config(recipe), tmp_path / "merged", base_dir=recipe.parent, notice=lines.append)
        assert live.exists() and lines == []  # another process is writing it
    finally:
        (tmp_path / "go").touch()
    assert running.wait(timeout=120) == 0, running.stdout.read()
    assert not live.exists() and partials(out) == []  # it finished and renamed its own partial


def test_only_partials_of_this_target_whose_owner_has_ended_are_removed(tmp_path):
    from mixtune.merge.partials import OWNER, _start_time, reap_stale_partials

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    here, me = socket.gethostname(), os.getpid()

    def partial(name, owner=None):
        p = tmp_path / name
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"\0" * 2**20)
        if owner is not None:
            (p / OWNER).write_text(json.dumps(owner))
        return p

    dead = partial(".out.abcd1234.partial", {"host": here, "pid": ended.pid})
    # a live process has the pid, but it started at another time: the pid was reused
    reused = partial(".out.efgh5678.partial", {"host": here, "pid": me, "started": "1"})
    mine = partial(".out.ijkl9012.partial", {"host": here, "pid": me, "started": _start_time(me)})
    remote = partial(".out.mnop3456.partial", {"host": here + "-elsewhere", "pid": ended.pid})
    unknown = partial(".out.qrst7890.partial")  # no owner recorded (an older mixtune, or a training export)
    other = partial(".out.v2.uvwx1234.partial", {"host": here, "pid": ended.pid})  # the target out.v2's
    assert _start_time(me) is not None  # Linux: /proc gives each process's start time
    lines = []
    removed = reap_stale_partials(tmp_path / "out", lines.append)
    assert removed == [dead, reused] and not dead.exists() and not reused.exists()
    assert all(p.exists() for p in (mine, remote, unknown, other))
    assert f"removed stale partial folder {dead} (1.0 MiB) from an interrupted merge (process {ended.pid} has ended)" \
        in lines
    assert any(line.startswith(f"kept partial folder {remote} (1.0 MiB): written by process {ended.pid} on host "
                               f"{here}-elsewhere; delete it if nothing is writing") for line in lines)
    assert any(line.startswith(f"kept partial folder {unknown} (1.0 MiB): its writer is not recorded")
               for line in lines)
    assert not any(str(mine) in line or str(other) in line for line in lines)
