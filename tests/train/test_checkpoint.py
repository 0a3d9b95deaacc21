"""What a run writes to disk and resumes from: stage exports (adapters as adapters), checkpoints
only with ``save_every``, at most ``keep_checkpoints`` of them, resume after the last export."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mixtune.core import validate
from mixtune.pipeline import run_training
from mixtune.recipe import Recipe
from mixtune.train.config import RunOptions


class Killed(Exception):
    pass


def recipe(tiny_dir, **train) -> Recipe:
    return validate(Recipe, {
        "model": str(tiny_dir),
        "sources": {n: {"builtin": n, "n": 40} for n in ("math", "code", "general")},
        "format": {"seq_len": 96},
        "strategy": {"name": "dmt", "k": 0.25},
        "train": {"lr": 1e-3, "steps": 3, "batch_size": 4, "micro_batch_size": 4, "precision": "fp32"}
                 | {k: v for k, v in train.items() if k not in RunOptions.model_fields},
        "run": {"log_every": 1} | {k: v for k, v in train.items() if k in RunOptions.model_fields},
    })


def run(tiny_dir, out, kill_at=None, on_step=None, resume=True, **train):
    def hook(step):
        if on_step is not None:
            on_step(step)
        if step == kill_at:
            raise Killed

    return run_training(recipe(tiny_dir, **train), tiny_dir, out, progress=False, on_step=hook, resume=resume)


def trained_weights(folder):
    """The tensors an export holds: the full model, the peft adapter or the experts."""
    name = next(n for n in ("adapter_model.safetensors", "moe_lora.safetensors", "model.safetensors")
                if (folder / n).exists())
    return load_file(folder / name)


def folder_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_folders(out):
    """Every folder under OUT/checkpoints, complete or being written."""
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


@pytest.mark.parametrize("method", [
    {"name": "full"},
    {"name": "hft"},  # a new half trains in stage 2; the half trained in stage 1 comes back from its export
    {"name": "lora", "r": 4},
    {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "options": {"init_lora_weights": "pissa"}},
    {"name": "moe_lora", "experts": 2, "r": 2},
], ids=["full", "hft", "lora", "pissa", "moe_lora"])
def test_without_save_every_no_checkpoint_is_written_and_a_run_killed_between_stages_resumes_from_its_export(
        tiny_dir, tmp_path, method):
    full = run(tiny_dir, tmp_path / "full", method=method)
    assert not (tmp_path / "full" / "checkpoints").exists()
    with pytest.raises(Killed):  # after stage 1's export, 1 step into stage 2
        run(tiny_dir, tmp_path / "r", kill_at=4, method=method)
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert (tmp_path / "r" / "stages" / "1-specialists" / "mixtune.yaml").exists()
    resumed = run(tiny_dir, tmp_path / "r", method=method)
    want, got = trained_weights(full[-1]), trained_weights(resumed[-1])
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    notes = [json.loads(line).get("note", "") for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert f"resuming from {tmp_path / 'r' / 'stages' / '1-specialists'} (stage 0, step 3)" in notes
    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()
             if '"step"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]  # stage 2's first step was logged again, not twice


def test_keep_checkpoints_bounds_the_folders_on_disk_at_every_step_and_after_a_resume(tiny_dir, tmp_path):
    want = run(tiny_dir, tmp_path / "plain", steps=6)
    out, seen = tmp_path / "r", []

    def count(step):
        seen.append((step, checkpoint_folders(out)))

    with pytest.raises(Killed):  # stage 2 (steps 7-12), 3 steps in
        run(tiny_dir, out, kill_at=9, on_step=count, steps=6, save_every=2, keep_checkpoints=3)
    assert all(len(names) <= 3 for _, names in seen), seen
    assert seen[5][1] == ["step-0000002", "step-0000004"]  # step 6, the end of stage 1, is exported instead
    assert checkpoint_folders(out) == ["step-0000008"]  # stage 1's were deleted with its export
    # resumed with a smaller budget: at most 1 on disk from the first step on
    seen.clear()
    got = run(tiny_dir, out, on_step=count, steps=6, save_every=2, keep_checkpoints=1)
    assert seen[0][0] == 9 and all(len(names) <= 1 for _, names in seen), seen
    assert not (out / "checkpoints").exists()  # the final export supersedes them all
    a, b = trained_weights(want[-1]), trained_weights(got[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_lora_run_writes_adapters_and_adapter_checkpoints_not_the_model(tiny_dir, tmp_path):
    out, ckpt_keys = tmp_path / "lora", []

    def peek(step):
        for f in (out / "checkpoints").glob("step-*/model.safetensors"):
            with safe_open(str(f), "pt") as h:
                ckpt_keys.append(set(h.keys()))

    folders = run(tiny_dir, out, on_step=peek, method={"name": "lora", "r": 4}, save_every=2)
    assert ckpt_keys and all(keys and all("lora_" in k for k in keys) for keys in ckpt_keys)  # the adapter only
    for f in folders:
        names = set(os.listdir(f))
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "mixtune.yaml"} <= names
        assert not {"model.safetensors", "merged"} & names
        assert all(v.dtype == torch.float32 for v in load_file(f / "adapter_model.safetensors").values())
    base = folder_bytes(tiny_dir)
    # Measured: 0.84 MB for the whole run (two ~0.4 MB adapters, most of it the tokenizer) against a
    # 4.5 MB base; before, a stage-end checkpoint alone held the full model (5.7 MB).
    assert folder_bytes(out) < base / 4
    merged = run(tiny_dir, tmp_path / "merged", method={"name": "lora", "r": 4, "merge": True})
    assert (merged[-1] / "merged" / "model.safetensors").exists()  # the full model only when asked for


def test_a_fresh_run_deletes_what_the_replaced_run_left(tiny_dir, tmp_path):
    out = tmp_path / "r"
    run(tiny_dir, out, save_every=2)
    (out / "checkpoints" / "step-0000099").mkdir(parents=True)  # a stale checkpoint of an older run
    with pytest.raises(Killed):
        run(tiny_dir, out, kill_at=1, resume=False, save_every=2)
    assert not list((out / "stages").iterdir()) and not (out / "checkpoints").exists()
    run(tiny_dir, out, save_every=2)  # restarts stage 1: nothing of the old run is taken for this one's
    notes = [json.loads(line).get("note", "") for line in (out / "log.jsonl").read_text().splitlines()]
    fresh = next(i for i, n in enumerate(notes) if n.startswith("starting over: deleted"))
    assert not any("resuming" in n for n in notes[fresh:])


def test_a_study_trains_one_adapter_through_a_runs_stages_as_mixtune_train_does(tiny_dir, tmp_path):
    from mixtune.eval import load_for_eval
    from mixtune.models import load_model
    from mixtune.study import Study, StudyConfig, expand, stage_keys

    def study(out, method):
        cfg = validate(StudyConfig, {
            "model": str(tiny_dir), "sources": {n: {"builtin": n, "n": 30} for n in ("math", "general")},
            "format": {"seq_len": 96}, "strategies": [{"name": "sequential", "order": ["math", "general"]}],
            "methods": [method], "train": {"lr": 5e-3, "steps": 2, "batch_size": 4, "micro_batch_size": 4,
                                           "precision": "fp32"},
            "eval": {"n": 2, "abilities": ["math"]}})
        s = Study(cfg, out, progress=False, log=lambda m: None)
        s.run()
        return s, stage_keys(cfg, next(r for r in expand(cfg) if r.stages))

    adapters, keys = study(tmp_path / "a", {"name": "lora", "r": 2})
    merged, merged_keys = study(tmp_path / "m", {"name": "lora", "r": 2, "merge": True})
    for key in keys:  # adapters only: no full model is written for a LoRA stage
        names = set(os.listdir(adapters.model_dir(key)))
        assert "adapter_model.safetensors" in names and not {"model.safetensors", "merged"} & names
    second = json.loads((adapters.model_dir(keys[1]) / "adapter_config.json").read_text())
    # stage 2 goes on training stage 1's adapter, so it adapts the starting model (outside the study: absolute)
    assert second["base_model_name_or_path"] == str(tiny_dir.resolve())
    assert merged.model_path(merged_keys[-1]).name == "merged"
    # writing merged/ beside each adapter changes nothing in what trains
    a = trained_weights(adapters.model_dir(keys[1]))
    m = trained_weights(merged.model_dir(merged_keys[1]))
    assert a.keys() == m.keys() and all(torch.equal(a[k], m[k]) for k in a)
    chained = load_for_eval(adapters.model_path(keys[-1]))[0].state_dict()
    full = load_model(merged.model_path(merged_keys[-1]))[0].state_dict()
    assert all(torch.equal(chained[k], full[k]) for k in full)
    assert [r["value"] for r in adapters.results()] == [r["value"] for r in merged.results()]


def test_partials_are_reaped_or_completed_and_pruning_keeps_the_newest(tmp_path):
    from mixtune.train.checkpoint import prune, reap_partials

    for name, complete in [(".step-0000005.partial", False), (".step-0000007.partial", True)]:
        (tmp_path / name).mkdir()
        if complete:  # trainer_state.json is written last: the run died just before the rename
            (tmp_path / name / "trainer_state.json").write_text("{}")
    for step in (1, 3):
        (tmp_path / f"step-{step:07d}").mkdir()
    reap_partials(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000001", "step-0000003", "step-0000007"]
    prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000003", "step-0000007"]
    prune(tmp_path, 0)  # room for a new one under keep_checkpoints = 1
    assert not list(tmp_path.iterdir())
    for step in (2, 4, 6):
        (tmp_path / f"step-{step:07d}").mkdir()
    prune(tmp_path, 5, upto=4)  # an export at global step 4 supersedes 2 and 4
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000006"]
