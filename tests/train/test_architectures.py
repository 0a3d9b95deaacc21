"""Every tuning method on tiny random instances of eight transformers architectures: each trains two
steps through the real loop, trains the share it promises (checked against matrices listed here by
hand, not by mixtune's structure finder), saves, reloads to the same logits and, where cheap,
merges; or is refused with a message that names the block and what was expected."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mixtune.core import ConfigError, validate
from mixtune.eval import load_for_eval
from mixtune.models import load_model
from mixtune.models.structure import find_structure
from mixtune.pipeline import prepare_data, stage_plan
from mixtune.recipe import Recipe
from mixtune.train.loop import train

H, I, LAYERS = 32, 64, 2  # hidden, FFN inner size, blocks
COMMON = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS, num_attention_heads=4,
              max_position_embeddings=128)
LLAMA_ATTN, LLAMA_FFN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"], \
    ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

# arch -> (config class, its fields, attention matrices, FFN matrices (paths in a block), the attention
# matrix moe_lora adapts; None where moe_lora must refuse, see REFUSED)
ARCHS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2), LLAMA_ATTN, LLAMA_FFN, "q_proj"),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2), LLAMA_ATTN, LLAMA_FFN, "q_proj"),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2), LLAMA_ATTN, LLAMA_FFN, "q_proj"),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=8), LLAMA_ATTN, LLAMA_FFN, "q_proj"),
    "phi3": ("Phi3Config", dict(num_key_value_heads=2), ["self_attn.o_proj", "self_attn.qkv_proj"],
             ["mlp.gate_up_proj", "mlp.down_proj"], "qkv_proj"),
    "phi": ("PhiConfig", dict(resid_pdrop=0.0, embd_pdrop=0.0),
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"], ["mlp.fc1", "mlp.fc2"],
            None),
    "gpt2": ("GPT2Config", dict(n_embd=H, n_layer=LAYERS, n_head=4, n_positions=128, n_inner=I, resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0),
             ["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"], None),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_dropout=0.0, attention_dropout=0.0),
                 ["attention.query_key_value", "attention.dense"], ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"], None),
}
METHODS = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "r": 2, "merge": True},
    "hft": {"name": "hft"},
    "lift": {"name": "lift", "rank": 2, "filter_rank": 2},
    "moe_lora": {"name": "moe_lora", "experts": 2, "top_k": 1, "r": 2},
    "peft_loha": {"name": "peft", "type": "LOHA", "config": {"r": 2, "target_modules": "all-linear"}},
}
# (arch, method) -> what the refusal must say: MixLoRA needs a gated FFN; peft's LoHa has no Conv1D layer
REFUSED = {
    ("phi", "moe_lora"): r"moe_lora: PhiDecoderLayer \(model.layers.0\) FFN matrices mlp.fc1, mlp.fc2: not a gated FFN",
    ("gpt2", "moe_lora"): r"moe_lora: GPT2Block \(transformer.h.0\) FFN .*expected nn.Linear layers, found Conv1D",
    ("gpt_neox", "moe_lora"): r"moe_lora: GPTNeoXLayer .*mlp.dense_h_to_4h, mlp.dense_4h_to_h: not a gated FFN",
    ("gpt2", "peft_loha"): "LOHA cannot adapt GPT2LMHeadModel: .*Conv1D",
}


def recipe(folder, method) -> Recipe:
    return validate(Recipe, {
        "model": str(folder),
        "sources": {n: {"builtin": n, "n": 12} for n in ("math", "general")},
        "format": {"seq_len": 96},
        "strategy": {"name": "multi_task"},
        "train": {"lr": 1e-2, "steps": 2, "batch_size": 4, "micro_batch_size": 4, "precision": "fp32",
                  "method": method},
        "run": {"log_every": 1},
    })


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """arch -> a folder with a random-initialised tiny model of that architecture and the built-in tokenizer."""
    import transformers

    out = {}
    for arch, (cls, fields, *_) in ARCHS.items():
        # 16 spare rows: transformers loads this tokenizer in a qwen2 folder as Qwen2Tokenizer, which adds <|endoftext|>
        ids = dict(vocab_size=len(tokenizer) + 16, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        base = {} if arch == "gpt2" else COMMON
        config = getattr(transformers, cls)(**base | fields | ids)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        folder = tmp_path_factory.mktemp(arch)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[arch] = folder
    return out


@pytest.fixture(scope="module")
def plans(folders, tokenizer, tmp_path_factory):
    """The stage, packed once: every architecture shares the built-in tokenizer."""
    r = recipe(folders["llama"], {"name": "full"})
    data = prepare_data(r, tmp_path_factory.mktemp("data"), tokenizer)
    return stage_plan(r, data), data.source_names


def sizes(out) -> dict:
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return next(e for e in log if "trainable_params" in e)


def hand_matrices(arch: str, weights: dict) -> tuple[dict, dict]:
    """Per block, attention and FFN parameter names (weight and bias) of the hand-listed matrices."""
    _, _, attn, ffn, _ = ARCHS[arch]
    prefix = next(k.split(".0.")[0] for k in weights if ".0." in k)  # model.layers, transformer.h, gpt_neox.layers
    def params(i, path):
        return [k for k in weights if k.startswith(f"{prefix}.{i}.{path}.")]
    return ({i: {p: params(i, p) for p in attn} for i in range(LAYERS)},
            {i: {p: params(i, p) for p in ffn} for i in range(LAYERS)})


def test_structure_is_found_from_the_module_tree(folders):
    for arch, (_, _, attn, ffn, _) in ARCHS.items():
        structure = find_structure(load_model(folders[arch])[0])
        assert len(structure.blocks) == LAYERS
        for block in structure.blocks:
            assert sorted(m.path for m in block.attention) == sorted(attn), arch
            assert sorted(m.path for m in block.ffn) == sorted(ffn), arch
        fused = {m.path: m.fused for m in structure.blocks[0].matrices if m.fused}
        assert fused == {"phi3": {"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")},
                         "gpt2": {"attn.c_attn": ("q", "k", "v")},
                         "gpt_neox": {"attention.query_key_value": ("q", "k", "v")}}.get(arch, {}), arch


def test_user_names_are_paths_in_the_block_and_their_role_decides(folders):
    from mixtune.train.methods.hft import HftParams, select

    structure = find_structure(load_model(folders["gpt2"])[0])
    block = structure.blocks[0]
    assert block.find("c_proj", "attention", "w").path == "attn.c_proj"  # not the MLP's c_proj
    assert block.find("c_proj", "ffn", "w").path == "mlp.c_proj"
    assert block.find("mlp.c_proj", "attention", "w").path == "mlp.c_proj"  # a path says which one
    p = HftParams(attention=["c_attn", "c_proj"], ffn=["c_fc", "mlp.c_proj"])
    assert select(structure, p, 0, 0) == select(structure, HftParams(), 0, 0)
    chosen = select(structure, HftParams(attention=["c_attn", "c_proj"], ffn=["c_fc"]), 0, 0)
    assert not any(".mlp.c_proj." in n for n in chosen)
    with pytest.raises(ConfigError, match=r"GPT2Block \(transformer.h.0\) has no matrix 'q_proj'; its matrices are "
                                          r"attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"):
        select(structure, HftParams(attention=["q_proj", "v_proj"]), 0, 0)


def test_blocks_without_transformers_metadata_are_the_list_of_identical_modules():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = torch.nn.ModuleDict({"wq": torch.nn.Linear(4, 4), "wo": torch.nn.Linear(4, 4)})
            self.fc1, self.fc2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)  # an FFN sitting on the block (OPT)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleList([torch.nn.Linear(4, 4)])  # smaller than the blocks
            self.stack = torch.nn.ModuleList([Block() for _ in range(3)])

    structure = find_structure(Net())
    assert structure.container == "stack" and len(structure.blocks) == 3
    assert [m.path for m in structure.blocks[2].attention] == ["attention.wq", "attention.wo"]
    assert [m.path for m in structure.blocks[2].ffn] == ["fc1", "fc2"]


def test_a_share_far_from_the_promise_is_an_error():
    from mixtune.train.methods.base import check_share

    model = torch.nn.Linear(10, 10)
    assert check_share("hft", model, trained=50, intended=100, of="block-matrix parameters", low=0.25,
                       high=0.75) == 0.5
    # the Phi-3 case: 8,192 of 6.37M parameters trained while half was promised
    with pytest.raises(ConfigError, match=r"hft: 8,192 train, 0.1% of 6,370,000 block-matrix parameters "
                                          r"\(intended 25%-75%\)"):
        check_share("hft", model, trained=8192, intended=6_370_000, of="block-matrix parameters", low=0.25, high=0.75)
    with pytest.raises(ConfigError, match="0 train"):
        check_share("lora", model, trained=0, intended=10, of="adapter parameters")


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_method_trains_its_share_saves_and_reloads(arch, method, folders, plans, tmp_path):
    stages, source_names = plans
    folder = folders[arch]
    spec = METHODS[method] | ({"attention": [ARCHS[arch][4]]} if method == "moe_lora" and ARCHS[arch][4] else {})
    cfg = recipe(folder, spec).train
    model, tok = load_model(folder)
    refusal = REFUSED.get((arch, method))
    if refusal:
        with pytest.raises(ConfigError, match=refusal):
            train(model, tok, stages, cfg, tmp_path, source_names=source_names, progress=False)
        return
    out = train(model, tok, stages, cfg, tmp_path, source_names=source_names, progress=False)[-1]
    n = sizes(tmp_path)
    base = load_file(folder / "model.safetensors")

    if method == "full":
        assert n["trainable_params"] == n["total_params"] == sum(p.numel() for p in model.parameters())
    elif method in ("lora", "peft_loha"):
        adapter = load_file(out / "adapter_model.safetensors")
        assert n["trainable_params"] == sum(t.numel() for t in adapter.values()) > 0
    elif method == "hft":
        after = load_file(out / "model.safetensors")
        attn, ffn = hand_matrices(arch, base)
        moved = {k for k in base if not torch.equal(base[k], after[k])}
        pool = {k for group in (attn, ffn) for blk in group.values() for ks in blk.values() for k in ks}
        assert moved <= pool  # only block matrices train
        # a unit (a matrix with its bias) trained when any of it moved: a key bias gets no gradient
        trained = [ks for group in (attn, ffn) for blk in group.values() for ks in blk.values() if set(ks) & moved]
        for i in range(LAYERS):  # half of each block's attention units, a fused qkv counting as one
            assert sum(bool(set(ks) & moved) for ks in attn[i].values()) == len(attn[i]) // 2
        ffn_units = [bool(set(ks) & moved) for blk in ffn.values() for ks in blk.values()]
        assert sum(ffn_units) == len(ffn_units) // 2  # half of all FFN units (2 blocks)
        n_trained = sum(base[k].numel() for ks in trained for k in ks)
        share = n_trained / sum(base[k].numel() for k in pool)
        assert 0.25 <= share <= 0.75, share  # hft.SHARE: matrices are drawn by count, not size
        assert n["trainable_params"] == n_trained
    elif method == "lift":
        after = load_file(out / "model.safetensors")
        attn, ffn = hand_matrices(arch, base)
        mats = [ks for group in (attn, ffn) for blk in group.values() for ks in blk.values()]
        weights = [next(k for k in ks if k.endswith(".weight")) for ks in mats]
        k_of = {w: min(sum(base[w].shape) * 2, base[w].numel()) for w in weights}  # K = min((m + n) r, m n)
        assert n["trainable_params"] == sum(k_of.values())  # every block matrix, Conv1D included
        for k in base:
            moved = int((base[k] != after[k]).sum())
            assert moved <= k_of.get(k, 0), k  # nothing else moves; at most K entries of each matrix
    elif method == "moe_lora":
        r, experts = METHODS[method]["r"], METHODS[method]["experts"]
        name = ARCHS[arch][4]
        attn_w = next(v for k, v in base.items() if k.endswith(f".0.self_attn.{name}.weight"))
        # per block: experts x LoRA(gate, up: r (H + I) each; down: r (I + H)) + router E x H; q LoRA r (in + out)
        want = LAYERS * (experts * (3 * r * (H + I) + H) + r * sum(attn_w.shape))
        assert n["trainable_params"] == want

    # the export reloads to the model that trained (adapters and experts onto their base)
    ids = tok("Question: what is 2+3?", return_tensors="pt")["input_ids"]
    model.eval()
    reloaded = load_for_eval(out)[0].eval()
    with torch.no_grad():
        trained, again = model(ids).logits, reloaded(ids).logits
        first = load_model(folder)[0].eval()(ids).logits
    assert torch.allclose(trained, again, atol=1e-5)
    assert not torch.allclose(trained, first, atol=1e-5)  # two steps at lr 1e-2 change the output
    if method == "lora":  # merged into the base (peft's merge_and_unload), it is the same model
        merged = load_model(out / "merged")[0].eval()
        with torch.no_grad():
            assert torch.allclose(merged(ids).logits, trained, atol=1e-4)
    if method == "full":  # a weight-space merge of base and tuned loads as this architecture
        from mixtune.merge import MergeConfig, merge

        cfg = MergeConfig(method="linear", models=[{"model": folder}, {"model": out}])
        mixed = merge(cfg, tmp_path / "merged")
        a, b, m = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors"), \
            load_file(mixed / "model.safetensors")
        assert all(torch.allclose(m[k], (a[k] + b[k]) / 2, atol=1e-6) for k in a)
        load_model(mixed)
