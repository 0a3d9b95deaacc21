"""Sharded training: FSDP2 on two CPU processes under torchrun trains what DDP trains; the shipped
accelerate configs; DeepSpeed ZeRO-2/3 and accelerate's FSDP2 plugin where a GPU is (not run elsewhere)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixtune.core import ConfigError

RECIPE = """\
model: {base}
sources:
  math: {{builtin: math, n: 80}}
  code: {{builtin: code, n: 80}}
format: {{seq_len: 128}}
strategy: {{name: sequential}}
train: {{lr: 1.0e-3, steps: 4, batch_size: 8, micro_batch_size: 2, precision: fp32, method: {method}}}
run: {{log_every: 1, save_every: 2, distributed: {{strategy: {strategy}}}}}
"""

# Runs each job "RECIPE,OUT[,STOP]" in turn in every process; with STOP the run is interrupted after
# global step STOP (all processes at once) and resumed from its newest checkpoint in the same processes
# (a fresh model, optimizer and Accelerator; the process group stays).
# A spy keeps, next to each export, the weights gathered from the live model just before it is written.
DRIVER = """\
import os, sys
from pathlib import Path

import torch
import mixtune.train.loop as loop
from mixtune.pipeline import run_training
from mixtune.recipe import load_recipe


class Stop(Exception):
    pass


def spy(export):
    def wrapped(acc, model, tokenizer, tuner, params, dest, *args, **kwargs):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(acc.unwrap_model(model),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if acc.is_main_process:
            torch.save(full, Path(dest).parent.parent / f"gathered-{Path(dest).name}.pt")
        return export(acc, model, tokenizer, tuner, params, dest, *args, **kwargs)
    return wrapped


loop.export_stage = spy(loop.export_stage)
for job in sys.argv[1:]:
    recipe, out, *stop = job.split(",")
    cfg, base = load_recipe(recipe)

    def on_step(step, stop=int(stop[0]) if stop else 0):
        if step == stop:
            raise Stop

    try:
        run_training(cfg, base, Path(out), progress=False, on_step=on_step)
    except Stop:
        run_training(cfg, base, Path(out), progress=False)
"""

LORA = "{name: lora, r: 4, target_modules: [q_proj, v_proj]}"


def torchrun(tmp_path, *jobs):
    env = os.environ | {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "driver.py", *jobs], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]


def entries(out: Path) -> tuple[list[dict], str]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [e for e in lines if "step" in e and "loss" in e], "\n".join(e.get("note", "") for e in lines)


def test_fsdp2_on_two_cpu_processes_trains_what_ddp_trains(tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    (tmp_path / "driver.py").write_text(DRIVER)
    for name, method, strategy in [("full-ddp", "{name: full}", "ddp"), ("full-fsdp", "{name: full}", "fsdp2"),
                                   ("lora-ddp", LORA, "ddp"), ("lora-fsdp", LORA, "fsdp2")]:
        (tmp_path / f"{name}.yaml").write_text(RECIPE.format(base=tiny_dir, method=method, strategy=strategy))
    # one launch (two processes) trains the four runs in turn; each run seeds itself and picks its engine
    torchrun(tmp_path, "full-ddp.yaml,full-ddp", "lora-ddp.yaml,lora-ddp", "full-fsdp.yaml,full-fsdp,7",
             "lora-fsdp.yaml,lora-fsdp,7")

    for kind in ("full", "lora"):
        ddp, _ = entries(tmp_path / f"{kind}-ddp")
        fsdp, notes = entries(tmp_path / f"{kind}-fsdp")
        assert "2 process(es), accumulation 2; sharded by FSDP2 (mixtune's fully_shard)" in notes
        assert [e["step"] for e in ddp] == [e["step"] for e in fsdp] == list(range(1, 9))
        # Tolerance 1e-6 relative (the issue's): the shards' gradients are reduce-scattered instead of
        # all-reduced, another summation order (measured 3e-8); gradients averaged twice, or an
        # optimizer state lost on resume, move the losses far more.
        for a, b in zip(ddp, fsdp):
            assert a["lr"] == b["lr"]
            for k in [k for k in a if k.startswith("loss")]:
                assert abs(a[k] - b[k]) <= 1e-6 * a[k], (kind, k, a, b)
        # interrupted after step 7, resumed from the checkpoint of step 6 (weights and optimizer gathered whole)
        assert "checkpoints/step-0000006 (stage 1, step 2)" in notes
        assert not (tmp_path / f"{kind}-fsdp" / "checkpoints").exists()  # superseded by the export

    # the full export is a Hugging Face folder: it loads without the cluster, holding exactly the
    # weights gathered from the sharded model, and those of the DDP run up to summation order
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full-fsdp" / "stages" / "2-code")
    gathered = torch.load(tmp_path / "full-fsdp" / "gathered-2-code.pt")
    own = model.state_dict()
    assert set(gathered) == set(own)
    assert all(torch.equal(gathered[k], own[k]) for k in own)
    ddp_weights = load_file(tmp_path / "full-ddp" / "stages" / "2-code" / "model.safetensors")
    assert set(ddp_weights) == set(load_file(tmp_path / "full-fsdp" / "stages" / "2-code" / "model.safetensors"))
    # measured 1.2e-5 (the 1e-8 loss differences, through AdamW's first steps)
    assert max((own[k] - ddp_weights[k]).abs().max().item() for k in ddp_weights) < 1e-4
    start = load_file(tiny_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert not torch.equal(own["model.embed_tokens.weight"], start)  # and it did train

    # the LoRA export is the peft adapter alone, on the unchanged base
    adapter = tmp_path / "lora-fsdp" / "stages" / "2-code"
    assert not (adapter / "model.safetensors").exists()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter).state_dict()
    lora = {k: v for k, v in torch.load(tmp_path / "lora-fsdp" / "gathered-2-code.pt").items() if "lora_" in k}
    assert lora and all(torch.equal(v, tuned[k]) for k, v in lora.items())
    saved = load_file(adapter / "adapter_model.safetensors")
    ddp_saved = load_file(tmp_path / "lora-ddp" / "stages" / "2-code" / "adapter_model.safetensors")
    assert set(saved) == set(ddp_saved) and len(saved) == 2 * 2 * 4  # A and B of q, v in 4 layers
    assert max((saved[k] - ddp_saved[k]).abs().max().item() for k in saved) < 1e-4


def test_shipped_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    from mixtune.train.sharding import CONFIGS, config_path

    kinds = {p.stem: load_config_from_file(str(p)) for p in sorted(CONFIGS.glob("*.yaml"))}
    assert sorted(kinds) == ["ddp", "fsdp2", "zero2", "zero3"]  # the check sees every shipped config
    assert kinds["fsdp2"].fsdp_config["fsdp_version"] == 2
    assert [kinds[k].deepspeed_config["zero_stage"] for k in ("zero2", "zero3")] == [2, 3]
    assert kinds["zero3"].deepspeed_config["zero3_save_16bit_model"] is True  # exports gather whole weights
    assert all(c.num_machines == 1 and c.num_processes == 8 for c in kinds.values())
    assert config_path("zero3") == CONFIGS / "zero3.yaml"
    with pytest.raises(ConfigError, match="shipped: ddp, fsdp2, zero2, zero3"):
        config_path("zero1")


def test_sharding_refuses_what_it_does_not_run():
    from mixtune.train.methods.full import FullParams
    from mixtune.train.methods.hft import HftParams
    from mixtune.train.methods.lora import LoraParams
    from mixtune.train.sharding import Plan, check_plan

    fsdp, zero2 = Plan("fsdp2"), Plan("deepspeed", zero_stage=2)
    ok = dict(objectives=False, evaluating=False, mixed_precision="no")
    check_plan(fsdp, FullParams(), **ok)
    check_plan(zero2, LoraParams(merge=True), **(ok | {"evaluating": True}))  # ZeRO-2 keeps whole parameters
    check_plan(Plan("ddp"), HftParams(), **(ok | {"objectives": True, "evaluating": True}))
    for plan, method, kw, match in [
            (fsdp, HftParams(), {}, "train.method = hft does not run under FSDP2"),
            (zero2, FullParams(), {"objectives": True}, "objective"),
            (Plan("deepspeed", zero_stage=3), FullParams(), {"evaluating": True}, "run.eval"),
            (Plan("accelerate-fsdp2"), LoraParams(merge=True), {}, "merge"),
            (fsdp, LoraParams(options={"init_lora_weights": "pissa"}), {}, "pissa"),
            (fsdp, FullParams(), {"mixed_precision": "fp16"}, "fp16")]:
        with pytest.raises(ConfigError, match=match):
            check_plan(plan, method, **(ok | kw))


GPU_CASES = [("fsdp2", "needs a CUDA GPU"), ("zero2", "needs a CUDA GPU and deepspeed"),
             ("zero3", "needs a CUDA GPU and deepspeed")]


@pytest.mark.parametrize("config,reason", GPU_CASES, ids=[c for c, _ in GPU_CASES])
def test_accelerate_engines_on_gpus_train_what_one_gpu_trains(config, reason, tiny_dir, tmp_path):
    if not torch.cuda.is_available() or (config != "fsdp2" and importlib.util.find_spec("deepspeed") is None):
        pytest.skip(reason)
    from transformers import AutoModelForCausalLM

    from mixtune.train.sharding import config_path

    n = min(torch.cuda.device_count(), 2)
    recipe = RECIPE.format(base=tiny_dir, method="{name: full}", strategy="ddp")
    (tmp_path / "r.yaml").write_text(recipe.replace("save_every: 2", "save_every: 0"))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    for args in (["-m", "mixtune.cli", "train", "r.yaml", "--out", "one"],
                 ["-m", "accelerate.commands.launch", "--config_file", str(config_path(config)), "--num_processes",
                  str(n), "-m", "mixtune.cli", "train", "r.yaml", "--out", "sharded"]):
        out = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    one, _ = entries(tmp_path / "one")
    sharded, notes = entries(tmp_path / "sharded")
    assert "sharded by " + {"fsdp2": "FSDP2 (accelerate's plugin)", "zero2": "DeepSpeed ZeRO-2",
                            "zero3": "DeepSpeed ZeRO-3"}[config] in notes
    assert [e["step"] for e in one] == [e["step"] for e in sharded] == list(range(1, 9))
    # Tolerance: 1e-4 relative, for GPU kernels' nondeterministic sums in fp32 (a loss scaled by the
    # accumulation steps twice, or a step per micro-batch, differs by >1e-2)
    for a, b in zip(one, sharded):
        assert a["lr"] == b["lr"] and abs(a["loss"] - b["loss"]) <= 1e-4 * a["loss"], (a, b)
    w1 = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "stages" / "2-code").state_dict()
    w2 = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded" / "stages" / "2-code").state_dict()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-3
