"""HFT, LIFT and peft tuners by name: selection rules by hand, and the contract every method keeps
(only what it claims changes; save/load round trip; deterministic under a seed)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from mixtune.core import ConfigError, validate
from mixtune.models import load_model
from mixtune.models.structure import find_structure
from mixtune.pipeline import run_training
from mixtune.recipe import Recipe
from mixtune.train.methods.hft import HftParams, select
from mixtune.train.methods.lift import SparseAdamW, principal_mask


def recipe(tiny_dir, method, **train) -> Recipe:
    return validate(Recipe, {
        "model": str(tiny_dir),
        "sources": {n: {"builtin": n, "n": 40} for n in ("math", "general")},
        "format": {"seq_len": 96},
        "strategy": {"name": "dmt", "k": 0.25},
        "train": {"lr": 1e-2, "steps": 3, "batch_size": 4, "micro_batch_size": 4, "precision": "fp32",
                  "method": method} | train,
        "run": {"log_every": 1},
    })


def weights(folder):
    return load_file(folder / "model.safetensors")


def changed(before: dict, after: dict) -> set:
    return {k for k in before if not torch.equal(before[k], after[k])}


# -- HFT ----------------------------------------------------------------------------------------

def tiny_llama(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, vocab_size=32, attention_bias=True))


def test_hft_trains_half_of_each_blocks_attention_and_half_of_all_ffn_matrices():
    structure = find_structure(tiny_llama())
    chosen = select(structure, HftParams(), seed=0, stage=0)
    per_block = [[n for n in chosen if f"layers.{i}." in n and n.endswith("weight")] for i in range(4)]
    for names in per_block:  # 2 of the 4 attention matrices in every block
        assert sum("self_attn" in n for n in names) == 2
    ffn = sorted(sum("mlp" in n for n in names) for names in per_block)
    assert ffn == [1, 1, 2, 2]  # 2 of 3 in half of the blocks, 1 of 3 in the other half: 6 of 12
    assert all(".layers." in n for n in chosen)  # embeddings, norms and the head stay frozen
    # a bias follows its matrix
    assert ("model.layers.0.self_attn.q_proj.bias" in chosen) == ("model.layers.0.self_attn.q_proj.weight" in chosen)
    assert select(structure, HftParams(), seed=0, stage=0) == chosen  # seeded
    assert select(structure, HftParams(), seed=0, stage=1) != chosen  # a new half at the next stage
    # the former default names pick the same matrices as the structure does on a Llama
    legacy = HftParams(attention=["q_proj", "k_proj", "v_proj", "o_proj"], ffn=["gate_proj", "up_proj", "down_proj"])
    assert select(structure, legacy, seed=0, stage=0) == chosen
    named = select(structure, HftParams(attention=["self_attn.q_proj", "v_proj"], ffn=["up_proj"]), 0, 0)
    assert {n.split(".")[-2] for n in named} <= {"q_proj", "v_proj", "up_proj"}
    with pytest.raises(ConfigError, match="has no matrix 'w_q'"):
        select(structure, HftParams(attention=["w_q", "v_proj"]), 0, 0)
    with pytest.raises(ConfigError, match="no decoder blocks"):
        find_structure(torch.nn.Sequential(torch.nn.Linear(2, 2)), "hft")


def test_hft_changes_only_its_half_each_stage_and_is_deterministic(tiny_dir, tmp_path):
    base = weights(tiny_dir)
    stage1, stage2 = run_training(recipe(tiny_dir, {"name": "hft"}), tiny_dir, tmp_path / "a", progress=False)
    structure = find_structure(load_model(tiny_dir)[0])
    for stage, before, after in [(0, base, weights(stage1)), (1, weights(stage1), weights(stage2))]:
        assert changed(before, after) == select(structure, HftParams(), seed=0, stage=stage)
    again = run_training(recipe(tiny_dir, {"name": "hft"}), tiny_dir, tmp_path / "b", progress=False)
    assert not changed(weights(stage2), weights(again[-1]))
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    sizes = [e for e in log if "trainable_params" in e]
    assert len(sizes) == 2 and sizes[0]["optimizer_bytes"] == 8 * sizes[0]["trainable_params"]
    assert sizes[0]["trainable_params"] < sizes[0]["total_params"] / 2


# -- LIFT ---------------------------------------------------------------------------------------

def test_principal_weights_are_the_top_k_of_the_low_rank_approximation():
    # W = u v^T is rank 1, so its rank-1 approximation is W: |W| = 1 .3 .1 | 2 .6 .2 | 3 .9 .3 | 5 1.5 .5;
    # K = min((4 + 3) * 1, 12) = 7 largest: 5, 3, 2, 1.5, 1, .9, .6 at flat indices 9, 6, 3, 10, 0, 7, 4
    w = torch.outer(torch.tensor([1.0, 2, 3, 5]), torch.tensor([1.0, 0.3, 0.1]))
    assert principal_mask(w, rank=1, filter_rank=1).tolist() == [0, 3, 4, 6, 7, 9, 10]
    # the approximation, not W itself, decides: a large entry in the second singular direction is
    # left out at filter_rank 1 and taken at full rank
    w2 = w.clone()
    w2[0, 2] = 4.0
    low, full = principal_mask(w2, 1, 1).tolist(), principal_mask(w2, 1, 3).tolist()
    assert 2 in full and 2 not in low and len(low) == len(full) == 7
    assert principal_mask(w, rank=5, filter_rank=1).numel() == 12  # the budget is capped at m n


def test_sparse_adamw_updates_only_its_entries_with_adam_and_carries_moments():
    p = torch.nn.Parameter(torch.zeros(3, 4))
    keep = torch.tensor([1, 5, 6])
    opt = SparseAdamW([p], select=lambda w: keep, lr=0.1, betas=(0.9, 0.999), eps=1e-6, update_interval=2)
    p.grad = torch.arange(12.0).reshape(3, 4) - 4
    opt.step()
    # first step: m = 0.1 g, v = 0.001 g^2, step size 0.1 sqrt(1 - .999) / (1 - .9); delta = -step m / (sqrt(v) + eps)
    g = p.grad.view(-1)[keep]
    step = 0.1 * math.sqrt(0.001) / 0.1
    want = -step * (0.1 * g) / ((0.001 * g * g).sqrt() + 1e-6)
    assert torch.allclose(p.detach().view(-1)[keep], want)
    assert p.detach().view(-1)[[0, 2, 3, 4, 7, 8, 9, 10, 11]].abs().sum() == 0
    assert opt.state_bytes() == 3 * 16
    # at the refresh (every 2 steps) entries that stay keep their moments, new ones start at 0
    m_before = opt.state[p]["exp_avg"].clone()
    opt.select = lambda w: torch.tensor([5, 6, 11])
    opt.step()
    st = opt.state[p]
    g = p.grad.view(-1)
    assert torch.allclose(st["exp_avg"][:2], 0.9 * m_before[1:] + 0.1 * g[[5, 6]]) and st["exp_avg"][2] == 0
    assert st["idx"].tolist() == [5, 6, 11]
    restored = SparseAdamW([p], select=lambda w: keep, lr=0.1)
    restored.load_state_dict(opt.state_dict())
    assert restored.state[p]["idx"].dtype == torch.long and restored.state[p]["idx"].tolist() == [5, 6, 11]


def test_lift_changes_only_principal_entries_of_block_linears(tiny_dir, tmp_path):
    method = {"name": "lift", "rank": 4, "filter_rank": 2, "update_interval": 100}
    base = weights(tiny_dir)
    out = run_training(recipe(tiny_dir, method), tiny_dir, tmp_path / "a", progress=False)
    after = weights(out[0])
    diff = changed(base, after)
    assert diff and all(".layers." in k and k.endswith("proj.weight") for k in diff)
    for k in diff:  # at most K entries of each matrix moved, and they are its principal weights at the start
        m, n = base[k].shape
        moved = (after[k] != base[k]).view(-1).nonzero().squeeze(1)
        allowed = set(principal_mask(base[k], 4, 2).tolist())
        assert len(moved) <= min((m + n) * 4, m * n) and set(moved.tolist()) <= allowed
    again = run_training(recipe(tiny_dir, method), tiny_dir, tmp_path / "b", progress=False)
    assert not changed(weights(out[-1]), weights(again[-1]))
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    sizes = next(e for e in log if "trainable_params" in e)
    k_total = sum(min((base[k].shape[0] + base[k].shape[1]) * 4, base[k].numel()) for k in base
                  if ".layers." in k and k.endswith("proj.weight"))
    assert sizes["optimizer_bytes"] == 16 * k_total  # proportional to K, not to the layers
    assert sizes["trainable_params"] == k_total  # the entries that train, not the matrices they sit in


# -- peft by name ---------------------------------------------------------------------------------

def test_peft_configs_are_checked_against_peft_classes(tiny_dir):
    from mixtune.train.methods.lora import peft_config

    assert peft_config("LORA", {"r": 4, "use_dora": True}, "m").use_dora
    assert type(peft_config("ia3", {"target_modules": ["q_proj"], "feedforward_modules": []}, "m")).__name__ == "IA3Config"
    with pytest.raises(ConfigError, match="did you mean 'use_dora'"):
        peft_config("LORA", {"use_dorra": True}, "train.method")
    with pytest.raises(ConfigError, match="did you mean LORA"):
        peft_config("LORRA", {}, "train.method")
    with pytest.raises(ConfigError, match="prompt-learning"):
        peft_config("PROMPT_TUNING", {"num_virtual_tokens": 4}, "train.method")
    with pytest.raises(ConfigError, match="calibration"):
        peft_config("LORA", {"init_lora_weights": "corda"}, "train.method")


@pytest.mark.parametrize("method", [
    {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "options": {"use_dora": True}},
    {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "options": {"init_lora_weights": "pissa"}},
    {"name": "peft", "type": "IA3", "config": {"target_modules": ["q_proj", "down_proj"],
                                               "feedforward_modules": ["down_proj"]}},
])
def test_adapters_round_trip_onto_the_original_base(tiny_dir, tmp_path, method):
    from peft import PeftModel


    out = run_training(recipe(tiny_dir, method | {"merge": True}), tiny_dir, tmp_path, progress=False)
    folder = out[0]
    assert (folder / "adapter_config.json").exists() and (folder / "merged" / "model.safetensors").exists()
    merged, tok = load_model(folder / "merged")
    base, _ = load_model(tiny_dir)  # the original base: PiSSA's adapter is converted to apply to it
    adapted = PeftModel.from_pretrained(base, folder)
    ids = tok("Question: what is 2+3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want, got = merged(ids).logits, adapted(ids).logits
        original = load_model(tiny_dir)[0](ids).logits
    assert torch.allclose(want, got, atol=1e-4) and not torch.allclose(want, original, atol=1e-4)


# -- mixture of LoRA experts ----------------------------------------------------------------------

def test_moe_lora_routes_top_k_and_mixes_by_renormalised_probabilities():
    from types import SimpleNamespace

    from mixtune.models.moe_lora import MoeLoraMLP
    from mixtune.train.methods.moe_lora import MoeLoraParams, aux_loss

    torch.manual_seed(0)
    lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
    mlp = SimpleNamespace(gate_proj=lin(2, 3), up_proj=lin(2, 3), down_proj=lin(3, 2), act_fn=torch.nn.SiLU())
    moe = MoeLoraMLP(mlp, MoeLoraParams(experts=3, top_k=2, r=1, alpha=1.0))
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, -1]]))
        for t in (moe.gate_B, moe.up_B, moe.down_B):
            t.normal_()
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    out = moe(x)
    # token 1: logits [2, 0, -2] -> experts 0 and 1; token 2: [0, 3, -3] -> experts 1 and 0
    for t, row in enumerate(x):
        p = torch.softmax(moe.router.weight @ row, 0)
        top = p.topk(2)
        want = torch.zeros(2)
        for w, e in zip(top.values / top.values.sum(), top.indices):
            g = mlp.gate_proj(row) + moe.gate_B[e] @ (moe.gate_A[e] @ row)
            u = mlp.up_proj(row) + moe.up_B[e] @ (moe.up_A[e] @ row)
            h = torch.nn.functional.silu(g) * u
            want += w * (mlp.down_proj(h) + moe.down_B[e] @ (moe.down_A[e] @ h))
        assert torch.allclose(out[t], want, atol=1e-6)
    # load balance: f = share of tokens with e in their top 2 = [1, 1, 0]; P = mean probabilities
    model = SimpleNamespace(modules=lambda: [moe], mixtune_moe_lora=MoeLoraParams(experts=3, aux_loss_coef=0.01))
    probs = torch.softmax(x @ moe.router.weight.T, -1)
    want = 0.01 * 3 * (torch.tensor([1.0, 1.0, 0.0]) * probs.mean(0)).sum()
    assert torch.allclose(aux_loss(model), want)


def test_moe_lora_trains_only_experts_logs_routing_per_source_and_reloads(tiny_dir, tmp_path):

    from mixtune.eval import load_for_eval

    method = {"name": "moe_lora", "experts": 4, "top_k": 2, "r": 4, "attention": ["q_proj"], "merge": True}
    out = run_training(recipe(tiny_dir, method), tiny_dir, tmp_path / "a", progress=False)
    folder = out[-1]
    assert not changed(weights(tiny_dir), weights(folder / "merged"))  # the base's own weights never move
    assert (folder / "moe_lora.safetensors").exists() and (folder / "moe_lora.json").exists()
    assert not (folder / "model.safetensors").exists()  # the stage itself is the experts alone, not the base again
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "routing" in e]
    routing = torch.tensor(steps[0]["routing"])  # sources x blocks x experts
    n_blocks = sum(1 for k in weights(tiny_dir) if k.endswith("mlp.down_proj.weight"))
    assert routing.shape == (2, n_blocks, 4) and "aux_loss" in steps[0]
    per_block = routing.sum(-1)  # every real token goes to exactly top_k = 2 experts in every block
    assert torch.equal(per_block, per_block[:, :1].expand_as(per_block)) and (per_block[:, 0] % 2 == 0).all()
    model, tok = load_for_eval(folder)  # the base its moe_lora.json names, with the experts rebuilt on it
    trained = sum(p.numel() for n, p in model.named_parameters() if "router" in n or "_A" in n or "_B" in n)
    assert trained > 0
    again = run_training(recipe(tiny_dir, method), tiny_dir, tmp_path / "b", progress=False)
    ids = tok("Question: what is 2+3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = model(ids).logits, load_for_eval(again[-1])[0](ids).logits
        merged = load_model(folder / "merged")[0](ids).logits  # the self-contained folder load_model reads alone
        base = load_model(tiny_dir)[0](ids).logits
    assert torch.equal(a, b) and torch.equal(a, merged)  # seeded; both forms are the same model
    assert not torch.allclose(a, base, atol=1e-4)  # and it learned something


def test_peft_fields_are_checked_when_the_recipe_is_read(tiny_dir):
    from mixtune.core import MixtuneError

    with pytest.raises(MixtuneError, match="did you mean 'use_dora'"):
        recipe(tiny_dir, {"name": "lora", "options": {"use_dorra": True}})
    with pytest.raises(MixtuneError, match="not a peft tuner"):
        recipe(tiny_dir, {"name": "peft", "type": "LORRA"})
