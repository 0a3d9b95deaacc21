"""LoRA extraction (``mixtune extract-lora``) against the dense delta it approximates.

The fine-tune is made from the base by adding to each changed weight a delta U diag(s) V^T of known
singular values s, so the exact answers are known: at a rank >= len(s) the adapter reproduces the
fine-tune, below it the squared error is the sum of the dropped s_i^2 (Eckart–Young), and an
energy threshold picks a rank that can be counted by hand. Adapters are loaded with peft itself.
mergekit's ``mergekit-extract-lora`` (a test extra) runs on the same folders for parity of B A.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mixtune.core import CheckpointError, ConfigError
from mixtune.merge.extract_lora import energy_rank, extract_config, extract_lora

pytestmark = pytest.mark.usefixtures("one_thread")

# the singular values added to each changed module of layer 0 (layer 1: only q_proj changes)
SPECTRA = {
    "model.layers.0.self_attn.q_proj": [3.0, 2.0, 1.0],
    "model.layers.0.self_attn.k_proj": [1.0],
    "model.layers.0.self_attn.v_proj": [2.0, 2.0],
    "model.layers.0.self_attn.o_proj": [3.0, 1.0, 1.0, 1.0],
    "model.layers.0.mlp.gate_proj": [1.0, 0.5, 0.25],
    "model.layers.0.mlp.up_proj": [2.0, 1.0],
    "model.layers.0.mlp.down_proj": [1.0, 1.0, 1.0],
    "model.layers.1.self_attn.q_proj": [1.0, 0.1],
    "model.embed_tokens": [2.0, 1.0],
    "lm_head": [1.5, 0.5],
}
SCALE = 0.1  # keeps the fine-tune's activations of the order of the base's
# Energy 0.9, counted by hand from the squares (cumulative fraction of the total in brackets):
#   q 9,4,1 (.64 .93) -> 2; k 1 -> 1; v 4,4 (.5 1) -> 2; o 9,1,1,1 (.75 .83 .92) -> 3;
#   gate 1,.25,.0625 (.76 .95) -> 2; up 4,1 (.8 1) -> 2; down 1,1,1 (.33 .67 1) -> 3; layer 1 q 1,.01 (.99) -> 1
ENERGY_90 = {"model.layers.0.self_attn.q_proj": 2, "model.layers.0.self_attn.k_proj": 1,
             "model.layers.0.self_attn.v_proj": 2, "model.layers.0.self_attn.o_proj": 3,
             "model.layers.0.mlp.gate_proj": 2, "model.layers.0.mlp.up_proj": 2, "model.layers.0.mlp.down_proj": 3,
             "model.layers.1.self_attn.q_proj": 1}


def low_rank(shape, spectrum, g):
    """U diag(s) V^T with orthonormal U (m, r), V (n, r) drawn from ``g``."""
    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(m, len(spectrum), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, len(spectrum), generator=g))
    return u @ torch.diag(torch.tensor(spectrum)) @ v.T


def make_pair(root, *, tied=False, bias=False, spectra=SPECTRA):
    """A small random float32 Llama as ``root/base`` and its fine-tune ``root/ft`` (deltas of known
    spectra; layer 0's input norm changed; everything else identical)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied, attention_bias=bias)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    deltas = {}
    for mod, s in spectra.items():
        key = f"{mod}.weight"
        if tied and mod == "lm_head":
            continue
        d = SCALE * low_rank(sd[key].shape, s, g)
        sd[key] += d
        deltas[mod] = sd[key] - base.state_dict()[key]  # the delta as the float32 checkpoint holds it
    if tied:  # load_state_dict would otherwise set the shared weight from the unchanged head
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    sd["model.layers.0.input_layernorm.weight"] += 0.1
    if bias:
        sd["model.layers.0.self_attn.q_proj.bias"] += 0.05 * torch.randn(32, generator=g)
    ft = LlamaForCausalLM(cfg)
    ft.load_state_dict(sd)
    ft.save_pretrained(root / "ft")
    return root / "base", root / "ft", deltas


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("extract"))


def products(folder):
    """Each LoRA module's scaled update s B A (as the base weight's shape), from the adapter files."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    t = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key in t:
        for a_suffix, b_suffix, emb in [(".lora_A.weight", ".lora_B.weight", False),
                                        (".lora_embedding_A", ".lora_embedding_B", True)]:
            if key.endswith(a_suffix):
                mod = key.removeprefix("base_model.model.").removesuffix(a_suffix)
                a, b = t[key].float(), t[key.removesuffix(a_suffix) + b_suffix].float()
                r = cfg["rank_pattern"].get(mod, cfg["r"])
                alpha = cfg["alpha_pattern"].get(mod, cfg["lora_alpha"])
                assert a.shape[0] == r
                p = alpha / r * (b @ a)
                out[mod] = p.T if emb else p
    return out


def peft_logits(base, adapter, x, merged=False):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter)
    if merged:
        return model.merge_and_unload().state_dict()
    with torch.no_grad():
        return model(x).logits


X = torch.tensor([[1, 5, 9, 20, 33, 47, 60, 95, 2]])


def ft_logits(ft):
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(ft)(X).logits


def test_energy_rank_counts_by_hand():
    s = torch.tensor([3.0, 2.0, 1.0])  # squares 9, 4, 1 of 14: cumulative .643, .929, 1
    assert [energy_rank(s, e) for e in (0.5, 0.643, 0.9, 0.93, 1.0)] == [1, 2, 2, 3, 3]
    assert energy_rank(torch.zeros(4), 0.9) == 0


def test_rank_at_least_r_reproduces_the_finetune_and_skips_unchanged_modules(pair, tmp_path):
    base, ft, deltas = pair
    result = extract_lora(base, ft, tmp_path / "a", extract_config(rank=4))
    got = products(tmp_path / "a")
    # linear modules only: embeddings and head are saved whole (mergekit's default)
    assert set(got) == {m for m in SPECTRA if m not in ("model.embed_tokens", "lm_head")}
    for mod, p in got.items():
        assert result.ranks[mod] == min(4, 32)
        assert torch.allclose(p, deltas[mod], atol=2e-6), (mod, (p - deltas[mod]).abs().max())
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    # identical modules (layer 1 except q_proj, the other norms) are in neither list
    assert sorted(cfg["modules_to_save"]) == ["lm_head", "model.embed_tokens", "model.layers.0.input_layernorm"]
    assert "model.layers.1.self_attn.k_proj" not in cfg["target_modules"]
    assert result.unchanged == 2 * 9 + 1 - 1 - 8  # 2 layers x 9 modules + final norm, less the 9 changed
    # peft: the base with the adapter computes the fine-tune's logits; merged, it holds the fine-tune's weights
    assert torch.allclose(peft_logits(base, tmp_path / "a", X), ft_logits(ft), atol=1e-5)
    merged = peft_logits(base, tmp_path / "a", X, merged=True)
    want = load_file(str(ft / "model.safetensors"))
    assert set(merged) >= set(want)
    for key, w in want.items():
        assert torch.allclose(merged[key], w, atol=2e-6), key
    # mixtune's own adapter reader (merge inputs) gives the same weights
    from mixtune.merge.adapter import AdapterReader
    from mixtune.merge.io import CheckpointReader

    reader = AdapterReader(tmp_path / "a", CheckpointReader(base))
    for key, w in want.items():
        assert torch.allclose(reader.get(key).float(), w, atol=2e-6), key


def test_rank_below_r_leaves_the_eckart_young_error(pair, tmp_path):
    base, ft, deltas = pair
    result = extract_lora(base, ft, tmp_path / "a", extract_config(rank=1))
    for mod, p in products(tmp_path / "a").items():
        s = torch.linalg.svdvals(deltas[mod]).double()
        bound = float((s[1:] ** 2).sum())  # the dropped singular values, squared
        err = float(((deltas[mod].double() - p.double()) ** 2).sum())
        assert err == pytest.approx(bound, rel=1e-4, abs=1e-10), mod
        assert result.kept[mod] == pytest.approx(float(s[0] ** 2 / (s ** 2).sum()), rel=1e-5)
    # peft's merged weights are the base plus the rank-1 truncation of each delta
    merged = peft_logits(base, tmp_path / "a", X, merged=True)
    w0 = load_file(str(base / "model.safetensors"))
    for mod, d in deltas.items():
        if mod in ("model.embed_tokens", "lm_head"):
            continue
        u, s, vh = torch.linalg.svd(d)
        assert torch.allclose(merged[f"{mod}.weight"], w0[f"{mod}.weight"] + s[0] * torch.outer(u[:, 0], vh[0]),
                              atol=2e-6), mod


def test_energy_threshold_picks_each_modules_rank(pair, tmp_path):
    base, ft, deltas = pair
    result = extract_lora(base, ft, tmp_path / "a", extract_config(energy=0.9))
    assert result.ranks == ENERGY_90
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 3
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {m: k for m, k in ENERGY_90.items() if k != 3}
    # peft builds each module at its own rank and computes base + truncated delta
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "a")
    for mod, k in ENERGY_90.items():
        layer = model.get_submodule(f"base_model.model.{mod}")
        assert layer.lora_A["default"].weight.shape[0] == k and layer.scaling["default"] == 1.0
    merged = model.merge_and_unload().state_dict()
    w0 = load_file(str(base / "model.safetensors"))
    for mod, k in ENERGY_90.items():
        u, s, vh = torch.linalg.svd(deltas[mod])
        truncated = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        assert torch.allclose(merged[f"{mod}.weight"], w0[f"{mod}.weight"] + truncated, atol=2e-6), mod
    # a rank cap lowers the largest
    capped = extract_lora(base, ft, tmp_path / "b", extract_config(energy=0.9, rank=2))
    assert capped.ranks == {m: min(k, 2) for m, k in ENERGY_90.items()}


def test_embedding_lora_options_and_dtype(pair, tmp_path):
    base, ft, deltas = pair
    # embed_lora: embedding LoRA for embed_tokens, linear LoRA for lm_head; the logits are still the fine-tune's
    result = extract_lora(base, ft, tmp_path / "e", extract_config(rank=4, embed_lora=True))
    t = load_file(str(tmp_path / "e" / "adapter_model.safetensors"))
    assert t["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 96)  # (r, vocab)
    assert result.whole == ["model.layers.0.input_layernorm"]
    got = products(tmp_path / "e")
    for mod in ("model.embed_tokens", "lm_head"):
        assert torch.allclose(got[mod], deltas[mod], atol=2e-6), mod
    assert torch.allclose(peft_logits(base, tmp_path / "e", X), ft_logits(ft), atol=1e-5)
    # without distribute_scale A = S V^T and B = U: B's columns are orthonormal
    extract_lora(base, ft, tmp_path / "n", extract_config(rank=4, distribute_scale=False))
    t = load_file(str(tmp_path / "n" / "adapter_model.safetensors"))
    b = t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.allclose(b.T @ b, torch.eye(4), atol=1e-5)
    a = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert torch.allclose(a.norm(dim=1), SCALE * torch.tensor([3.0, 2.0, 1.0, 0.0]), atol=1e-5)
    # include / exclude / save-module / skip-undecomposable, and the output dtype
    r = extract_lora(base, ft, tmp_path / "x", extract_config(
        rank=2, include=(r"layers\.0",), exclude=("k_proj",), modules_to_save=("up_proj",), skip_undecomposable=True,
        dtype="bfloat16"))
    assert set(r.ranks) == {m for m in ENERGY_90 if "layers.0" in m and "k_proj" not in m and "up_proj" not in m}
    assert sorted(r.whole) == ["lm_head", "model.embed_tokens", "model.layers.0.mlp.up_proj"]
    assert sorted(r.left_out) == ["model.layers.0.input_layernorm", "model.layers.0.self_attn.k_proj",
                                  "model.layers.1.self_attn.q_proj"]
    t = load_file(str(tmp_path / "x" / "adapter_model.safetensors"))
    assert {v.dtype for v in t.values()} == {torch.bfloat16}


def test_tied_embeddings_and_biases(tmp_path):
    base, ft, deltas = make_pair(tmp_path, tied=True, bias=True)
    for name, extra in [("whole", {}), ("lora", {"embed_lora": True})]:
        result = extract_lora(base, ft, tmp_path / name, extract_config(rank=4, **extra))
        cfg = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert cfg["bias"] == "lora_only"  # the changed q_proj bias travels as base_layer.bias
        assert ("lm_head" in result.whole) == (name == "whole") and ("lm_head" in result.ranks) == (name == "lora")
        assert torch.allclose(peft_logits(base, tmp_path / name, X), ft_logits(ft), atol=1e-5), name


def test_randomized_svd(pair, tmp_path):
    base, ft, deltas = pair
    extract_lora(base, ft, tmp_path / "r", extract_config(rank=4, svd="randomized"))
    for mod, p in products(tmp_path / "r").items():  # exactly low rank: found exactly
        assert torch.allclose(p, deltas[mod], atol=2e-6), mod
    # a full-rank delta: within 2% of the optimal squared error
    from mixtune.merge.extract_lora import decompose

    g = torch.Generator().manual_seed(3)
    spectrum = torch.diag(torch.linspace(1, 0.01, 64) ** 2)  # decaying, as fine-tuning deltas' do
    d = torch.randn(96, 64, generator=g) @ spectrum @ torch.randn(64, 64, generator=g)
    s = torch.linalg.svdvals(d).double()
    a, b, _ = decompose(d, extract_config(rank=8, svd="randomized"))
    err, bound = float(((d - b @ a).double() ** 2).sum()), float((s[8:] ** 2).sum())
    assert bound * (1 - 1e-4) <= err <= 1.02 * bound


def test_mergekit_parity(pair, tmp_path):
    """mergekit-extract-lora on the same folders: the same B A for every module both extract (its
    factors may differ by signs of singular vectors), the same tensors saved whole; the modules it
    extracts and mixtune skips (identical in both models) have B A = 0."""
    from click.testing import CliRunner as ClickRunner
    from mergekit.scripts.extract_lora import main as mk_main

    base, ft, deltas = pair
    for rank in (4, 2):
        mk, mx = tmp_path / f"mk{rank}", tmp_path / f"mx{rank}"
        # absolute paths: mergekit asks the Hub about any other (card.py:69)
        run = ClickRunner().invoke(mk_main, ["--model", str(ft.absolute()), "--base-model", str(base.absolute()),
                                           "--out-path", str(mk.absolute()), "--max-rank", str(rank)])
        assert run.exit_code == 0, run.output
        extract_lora(base, ft, mx, extract_config(rank=rank))
        theirs, ours = products(mk), products(mx)
        assert set(ours) <= set(theirs)
        for mod, p in theirs.items():
            want = ours.get(mod, torch.zeros_like(p))
            assert torch.allclose(p, want, atol=2e-6), (rank, mod, (p - want).abs().max())
        t_theirs = load_file(str(mk / "adapter_model.safetensors"))
        t_ours = load_file(str(mx / "adapter_model.safetensors"))
        whole = [k for k in t_theirs if ".lora_" not in k]
        w0 = load_file(str(base / "model.safetensors"))
        for k in whole:  # mergekit saves every norm; mixtune the changed ones
            assert torch.equal(t_theirs[k], t_ours[k] if k in t_ours else w0[k.removeprefix("base_model.model.")]), k


def test_cli_end_to_end_and_one_line_errors(pair, tmp_path):
    from mixtune.cli import app

    base, ft, _ = pair
    out = tmp_path / "cli"
    run = CliRunner().invoke(app, ["extract-lora", str(base), str(ft), "--out", str(out), "--energy", "0.9"])
    assert run.exit_code == 0, run.output
    assert "8 LoRA modules (ranks 1-3), 3 saved whole" in run.output
    assert json.loads((out / "extract_lora.json").read_text())["ranks"] == ENERGY_90

    def error(*args):
        got = CliRunner().invoke(app, ["extract-lora", *map(str, args)])
        assert isinstance(got.exception, (ConfigError, CheckpointError)), got.output
        assert "\n" not in str(got.exception)
        return str(got.exception)

    assert "rank = 0" in error(base, ft, "-o", tmp_path / "e", "--rank", "0")
    assert "energy = 0.0" in error(base, ft, "-o", tmp_path / "e", "--energy", "0")
    assert "energy = 1.5" in error(base, ft, "-o", tmp_path / "e", "--energy", "1.5")
    assert "give rank" in error(base, ft, "-o", tmp_path / "e")
    assert "randomized needs rank" in error(base, ft, "-o", tmp_path / "e", "--energy", ".9", "--svd", "randomized")
    assert "already exists" in error(base, ft, "-o", out, "--rank", "2")
    # another architecture, another shape
    other = tmp_path / "other"
    shutil.copytree(ft, other)
    conf = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(conf | {"architectures": ["MistralForCausalLM"],
                                                          "model_type": "mistral"}))
    assert "model_type 'mistral' differs" in error(base, other, "-o", tmp_path / "e", "--rank", "2")
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(**(conf | {"intermediate_size": 64})))
    wider.save_pretrained(tmp_path / "wider")
    msg = error(base, tmp_path / "wider", "-o", tmp_path / "e", "--rank", "2")
    assert "down_proj.weight has shape [32, 64]" in msg and "has [32, 48]" in msg and "vocabulary" not in msg
    LlamaForCausalLM(LlamaConfig(**(conf | {"vocab_size": 100}))).save_pretrained(tmp_path / "vocab")
    msg = error(base, tmp_path / "vocab", "-o", tmp_path / "e", "--rank", "2")
    assert "has shape [100, 32]" in msg and "resize the base's embeddings to 100 rows" in msg
    # a NaN met mid-way (layer 1) stops it with nothing left behind: no OUT, no partial folder
    from safetensors.torch import save_file

    shutil.copytree(ft, tmp_path / "nan")
    t = load_file(str(ft / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(t, str(tmp_path / "nan" / "model.safetensors"), metadata={"format": "pt"})
    msg = error(base, tmp_path / "nan", "-o", tmp_path / "e", "--rank", "2")
    assert msg.endswith("tensor model.layers.1.mlp.up_proj.weight holds NaN or Inf")
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.*"))
