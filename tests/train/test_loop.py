import json

import pytest
import torch
from safetensors.torch import load_file

from mixtune.core import validate
from mixtune.pipeline import run_training
from mixtune.recipe import Recipe
from mixtune.train.config import RunOptions


def recipe(tiny_dir, **train) -> Recipe:
    return validate(Recipe, {
        "model": str(tiny_dir),
        "sources": {n: {"builtin": n, "n": 60} for n in ("math", "code", "general")},
        "format": {"seq_len": 128},
        "strategy": {"name": "dmt", "k": 0.25},
        "train": {"lr": 1e-3, "steps": 6, "batch_size": 8, "micro_batch_size": 8, "precision": "fp32"}
                 | {k: v for k, v in train.items() if k not in RunOptions.model_fields},
        "run": {"log_every": 2} | {k: v for k, v in train.items() if k in RunOptions.model_fields},
    })


def weights(folder):
    return load_file(folder / ("adapter_model.safetensors" if (folder / "adapter_config.json").exists()
                               else "model.safetensors"))


def run(tiny_dir, out, **train):
    return run_training(recipe(tiny_dir, **train), tiny_dir, out, progress=False)


def test_training_writes_stages_log_and_lowers_each_source_loss(tiny_dir, tmp_path):
    folders = run(tiny_dir, tmp_path, steps=20, log_every=5)
    assert [f.name for f in folders] == ["1-specialists", "2-general+k=0.25"]
    for f in folders:
        assert (f / "model.safetensors").exists() and (f / "tokenizer.json").exists()
        assert "strategy" in (f / "mixtune.yaml").read_text()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "step" in e]
    assert [e["step"] for e in steps] == [5, 10, 15, 20, 25, 30, 35, 40]
    stage1, stage2 = steps[:4], steps[4:]
    assert set(stage1[0]) >= {"loss/math", "loss/code"} and "loss/general" not in stage1[0]
    assert set(stage2[0]) >= {"loss/math", "loss/code", "loss/general"}
    assert stage1[-1]["loss/math"] < stage1[0]["loss/math"] - 0.5  # it learns
    assert stage2[-1]["loss/general"] < stage2[0]["loss/general"]
    assert stage2[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine to zero at the end of each stage
    assert stage1[-1]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_gradient_accumulation_gives_the_same_update(tiny_dir, tmp_path):
    # the global batch is 8 rows either way: one micro-batch of 8, or 4 accumulated micro-batches of 2
    a = run(tiny_dir, tmp_path / "a", micro_batch_size=8)
    b = run(tiny_dir, tmp_path / "b", micro_batch_size=2)
    wa, wb = weights(a[-1]), weights(b[-1])
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    # Measured: 1.7e-4 here (summation order, amplified by Adam on near-zero gradients; 1.6e-5 with
    # the data order before named streams); the same config twice gives exactly 0; normalising each
    # micro-batch by its own token count (the classic accumulation bug) gives 6.8e-3 (7.5e-3 before).
    # The bound sits between the two.
    assert worst < 1e-3


def test_killed_mid_stage_and_resumed_equals_uninterrupted_bitwise(tiny_dir, tmp_path):
    full = run(tiny_dir, tmp_path / "full", save_every=4)

    class Killed(Exception):
        pass

    def kill_at_7(step):
        if step == 7:  # stage 2, step 1; stage 1's export (global step 6) supersedes its checkpoint at step 4
            raise Killed

    with pytest.raises(Killed):
        run_training(recipe(tiny_dir, save_every=4), tiny_dir, tmp_path / "resumed", progress=False, on_step=kill_at_7)
    assert not (tmp_path / "resumed" / "checkpoints").exists()
    resumed = run(tiny_dir, tmp_path / "resumed", save_every=4)
    assert "resuming from " + str(tmp_path / "resumed" / "stages" / "1-specialists") + " (stage 0, step 6)" in (
        tmp_path / "resumed" / "log.jsonl").read_text()
    for k, v in weights(full[-1]).items():
        assert torch.equal(v, weights(resumed[-1])[k]), k
    # and the log was rewritten, not duplicated
    steps = [json.loads(x).get("step") for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == [2, 4, 6, 8, 10, 12]


def test_how_a_run_goes_does_not_change_what_it_trains(tiny_dir, tmp_path):
    from mixtune.core import ConfigError

    # each varied here or in tests/train/test_evaluation.py; distributed (FSDP2 shards the same sums in
    # another order) in tests/train/test_fsdp.py, equal to DDP within tolerance
    assert set(RunOptions.model_fields) == {"log_every", "save_every", "keep_checkpoints", "eval", "distributed"}
    a = run(tiny_dir, tmp_path / "a")
    b = run(tiny_dir, tmp_path / "b", log_every=1, save_every=1, keep_checkpoints=3)
    for k, v in weights(a[-1]).items():
        assert torch.equal(v, weights(b[-1])[k]), k
    # they have a section of their own; under `train:` each is refused with its new place
    with pytest.raises(ConfigError, match=r"train.save_every moved to the `run` section \(run.save_every\)"):
        validate(Recipe, recipe(tiny_dir).model_dump(mode="json") | {"train": {"save_every": 2}})


def test_resume_mid_stage_from_a_periodic_checkpoint(tiny_dir, tmp_path):
    full = run(tiny_dir, tmp_path / "full", save_every=3, keep_checkpoints=5)

    def kill_at_5(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(recipe(tiny_dir, save_every=3), tiny_dir, tmp_path / "r", progress=False, on_step=kill_at_5)
    assert (tmp_path / "r" / "checkpoints" / "step-0000003").exists()  # mid stage 1
    resumed = run(tiny_dir, tmp_path / "r", save_every=3)
    for k, v in weights(full[-1]).items():
        assert torch.equal(v, weights(resumed[-1])[k]), k


def test_lora_adapter_loads_in_plain_peft(tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folders = run(tiny_dir, tmp_path, method={"name": "lora", "r": 4, "alpha": 8, "merge": True})
    stage = folders[-1]
    assert (stage / "adapter_config.json").exists() and not (stage / "model.safetensors").exists()
    adapter = weights(stage)
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B moved off its zero init
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    peft_model = PeftModel.from_pretrained(base, stage).eval()
    merged = AutoModelForCausalLM.from_pretrained(stage / "merged").eval()
    fresh = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        a, b, c = peft_model(ids).logits, merged(ids).logits, fresh(ids).logits
    assert torch.allclose(a, b, atol=1e-5)  # adapter == merged model
    assert (a - c).abs().max() > 1e-3  # and both differ from the untouched base


def test_gradient_checkpointing_changes_memory_not_results(tiny_dir, tmp_path):
    plain = run(tiny_dir, tmp_path / "plain")
    ckpt = run(tiny_dir, tmp_path / "ckpt", gradient_checkpointing=True)
    wa, wb = weights(plain[-1]), weights(ckpt[-1])
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4  # recomputation, same maths


def test_loss_cases_and_masked_thought_train_end_to_end(tiny_dir, tmp_path):
    from mixtune.core import ConfigError

    plain = run(tiny_dir, tmp_path / "plain")
    case3 = run(tiny_dir, tmp_path / "case3", loss="case3", task_weights={"math": 2.0})
    masked = run(tiny_dir, tmp_path / "mt", masked_thought={"rate": 0.4})
    w0, w3, wm = weights(plain[-1]), weights(case3[-1]), weights(masked[-1])
    assert all(torch.isfinite(v).all() for v in [*w3.values(), *wm.values()])
    assert max((w0[k] - w3[k]).abs().max().item() for k in w0) > 1e-4  # a different loss, different weights
    assert max((w0[k] - wm[k]).abs().max().item() for k in w0) > 1e-4  # corrupted inputs, different weights
    with pytest.raises(ConfigError, match="not sources"):
        run(tiny_dir, tmp_path / "bad", rewards={"maths": 1.0})


def test_runs_of_different_precisions_follow_one_another_in_one_process(tiny_dir, tmp_path):
    # accelerate keeps one state per process and refuses another mixed precision; mixtune starts it afresh
    from mixtune.train.loop import make_accelerator

    assert make_accelerator("fp32").mixed_precision == "no"
    assert make_accelerator("bf16").mixed_precision == "bf16"
    run(tiny_dir, tmp_path / "a", steps=1, precision="fp32")
    run(tiny_dir, tmp_path / "b", steps=1, precision="bf16")
    assert "precision bf16" in (tmp_path / "b" / "log.jsonl").read_text()


def test_a_compiled_model_trains_what_the_uncompiled_one_trains(tiny_dir, tmp_path):
    """train.compile traces the forward with torch.compile; the eager backend runs the traced graph with the same
    kernels, so the weights are the same (inductor's fused kernels would round differently); the saved names are
    the model's own. An unknown backend is a one-line error naming the option."""
    from mixtune.core import ConfigError

    from torch._dynamo.utils import counters

    plain = run(tiny_dir, tmp_path / "plain", steps=3)
    counters.clear()
    compiled = run(tiny_dir, tmp_path / "compiled", steps=3, compile="eager")
    assert counters["frames"]["ok"] >= 1  # the forward was traced: compiled, not ignored
    a, b = weights(plain[-1]), weights(compiled[-1])
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    with pytest.raises(ConfigError, match="train.compile = 'fastest': torch.compile knows .*inductor"):
        run(tiny_dir, tmp_path / "bad", steps=1, compile="fastest")
