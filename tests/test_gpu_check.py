"""bench/gpu_check.sh's dry mode (issue #20 item 4): every part runs on CPU at a tiny size and the JSON
has the GPU run's keys with finite positive figures, so the GPU check cannot rot unseen. The GPU
figures themselves are not measured here (docs/benchmarks.md, "GPU check")."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAINERS = ("train_mixtune", "train_hf_trainer", "train_trl")


def load_check():
    """bench/gpu_check.py as a module (loaded once)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
        sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)  # its dataclasses look it up there
        spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "figures.json"
    env = os.environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("GPU_CHECK_PEAK_FLOPS", None)
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


def test_dry_run_writes_every_part_without_errors(report):
    check = load_check()
    assert report["dry"] is True
    assert list(report["parts"]) == list(check.PARTS)
    errors = {k: v["error"] for k, v in report["parts"].items() if "error" in v}
    assert not errors
    m = report["machine"]
    assert positive(m["peak_flops"]) and "dry run" in m["peak_flops_source"]
    assert m["torch"] and m["transformers"] and m["trl"]


def test_training_figures_compare_like_with_like(report):
    parts = report["parts"]
    for name in TRAINERS:
        for key in ("tokens_per_s", "mfu", "timed_seconds", "tokens_per_step", "params"):
            assert positive(parts[name][key]), (name, key, parts[name].get(key))
        assert parts[name]["timed_steps"] == report["size"]["steps"] - report["size"]["warmup"]
    mx, hf, trl = (parts[n] for n in TRAINERS)
    # the same model, and mixtune and HF Trainer train on the very same packed rows
    assert mx["params"] == hf["params"] == trl["params"]
    assert mx["rows"] == hf["rows"] == report["size"]["steps"] * report["size"]["batch"]
    assert mx["tokens_per_step"] == pytest.approx(hf["tokens_per_step"], rel=1e-9)
    # TRL packs the same examples itself: about the same tokens per step
    assert trl["tokens_per_step"] == pytest.approx(mx["tokens_per_step"], rel=0.15)
    liger = parts["train_mixtune_liger"]  # the same run with train.fused_loss: liger (interpreted on CPU)
    assert positive(liger["tokens_per_s"]) and liger["tokens_per_step"] == mx["tokens_per_step"]
    s = report["summary"]
    assert positive(s["mixtune_liger_vs_trl"])
    assert positive(s["mixtune_vs_trl"]) and positive(s["mixtune_vs_hf_trainer"])
    assert s["target_mfu_0p4_met"] is None and s["target_vs_trl_1p3_met"] is None  # a CPU run judges no target


def test_generation_merge_and_smoke_figures(report):
    parts, size = report["parts"], report["size"]
    gen = parts["generate"]
    assert positive(gen["tokens_per_s"]) and positive(gen["seconds"])
    assert 0 < gen["generated_tokens"] <= size["gen_prompts"] * size["gen_new"]
    merge = parts["merge"]
    for method, inputs in (("linear", 2), ("ties", 3)):  # linear reads the fine-tunes; ties the base too
        r = merge[method]
        assert positive(r["seconds"]) and positive(r["gb_per_s"])
        assert r["read_gb"] == pytest.approx(inputs * r["written_gb"], rel=0.01)
    smoke = parts["smoke_fsdp2"]
    assert smoke["available"] is True and smoke["config"].endswith("fsdp2.yaml")
    assert smoke["steps"] == size["smoke_steps"] and positive(smoke["export_bytes"])
    assert math.isfinite(smoke["final_loss"]) and smoke["final_loss"] < smoke["first_loss"]
    for name in ("smoke_zero2", "smoke_zero3"):  # DeepSpeed needs CUDA: recorded as not run, never as passed
        assert parts[name]["available"] is False and "not available" in parts[name]["reason"]


def test_peak_flops_lookup(monkeypatch):
    check = load_check()
    assert check.peak_for("NVIDIA H200")[0] == 989e12
    assert check.peak_for("NVIDIA H100 PCIe")[0] == 756e12
    assert check.peak_for("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert check.peak_for("NVIDIA L40S")[0] == 362e12 and check.peak_for("NVIDIA L4")[0] == 121e12
    with pytest.raises(RuntimeError, match="GPU_CHECK_PEAK_FLOPS"):
        check.peak_for("Some Future GPU")
    monkeypatch.setenv("GPU_CHECK_PEAK_FLOPS", "1.5e15")
    assert check.peak_flops() == (1.5e15, "env GPU_CHECK_PEAK_FLOPS")


def test_a_gpu_run_isolates_each_part_and_keeps_to_its_budget():
    """The GPU run's path: each part in a fresh process; past its budget it is killed and recorded."""
    check = load_check()
    done = check.run_isolated("smoke_zero2", True, 120)
    assert done["available"] is False and "not available" in done["reason"]
    late = check.run_isolated("smoke_zero2", True, 0.05)
    assert late["error"].startswith("timed out after its budget")
