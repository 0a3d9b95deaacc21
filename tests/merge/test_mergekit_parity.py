"""A mergekit YAML run through mixtune gives the tensors mergekit 0.1.5 gives, bit for bit, in float32,
bfloat16 and float16 (mergekit is a test extra only: it is LGPL and never imported by mixtune itself).

Each test writes one mergekit config, runs it through mergekit's own ``run_merge`` and through
``mixtune merge``, and compares every tensor with ``torch.equal``; the random methods (DARE, DELLA),
whose masks mergekit draws from torch's global generator, are compared by their statistics.
"""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mixtune.merge import load_merge_config, merge

pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed(folder, root, dtype, seed=0, n=3):
    """``folder``'s model saved as ``root/base`` and ``n`` noisy 'fine-tunes' ``root/ft{i}``, in ``dtype``."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    base.to(dtype).save_pretrained(root / "base")
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        ft = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        ft.to(dtype).save_pretrained(root / f"ft{i}")
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_dir):
    """The built-in tiny model (4 layers, tied embeddings) as a float32 base and three perturbed 'fine-tunes'."""
    return perturbed(tiny_dir, tmp_path_factory.mktemp("parity"), torch.float32)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A Llama whose embedding and head exceed a million entries, of sizes no vector width divides
    (8201 x 130), untied: the chunked steps meet chunk and vector-tail boundaries mid-tensor. Stored in
    bfloat16, so that a config without ``dtype`` computes in it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8201, hidden_size=130, intermediate_size=200, num_hidden_layers=2,
                      num_attention_heads=5, num_key_value_heads=5, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(root / "src")
    return perturbed(root / "src", root, torch.bfloat16, seed=1)


def run_both(root, doc, name):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    (root / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    run_merge(MergeConfiguration.model_validate(doc), str(root / f"mk-{name}"),
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=False, quiet=True))
    merge(load_merge_config(root / f"{name}.yaml"), root / f"mx-{name}", overwrite=True)
    theirs = load_file(str(root / f"mk-{name}" / "model.safetensors"))
    ours = load_file(str(root / f"mx-{name}" / "model.safetensors"))
    return theirs, ours


def assert_same(theirs, ours):
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), (key, (ours[key].float() - theirs[key].float()).abs().max())


def models(root, n=3, **params):
    return [{"model": str(root / f"ft{i}"), "parameters": {"weight": w} | params}
            for i, w in enumerate([1.0, 0.5, 0.8][:n])]


GTA = [
    ("linear", {}, {}),
    ("task_arithmetic", {}, {"lambda": 0.7}),
    ("ties", {"density": 0.4}, {}),
    ("ties", {"density": 0.4}, {"normalize": False, "lambda": 0.9}),
    ("ties", {"density": 0.3}, {"rescale": True}),
    ("breadcrumbs", {"density": 0.3, "gamma": 0.05}, {}),
    ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.05}, {"rescale": True}),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("method,params,top", GTA)
def test_same_tensors_as_mergekit(checkpoints, method, params, top, dtype):
    doc = {"merge_method": method, "models": models(checkpoints, **params), "dtype": dtype}
    if method != "linear":
        doc["base_model"] = str(checkpoints / "base")
    if top:
        doc["parameters"] = top
    assert_same(*run_both(checkpoints, doc, f"{method}-{len(top)}-{dtype}"))


@pytest.mark.parametrize("method,params,top", [GTA[0], GTA[1], GTA[2], GTA[4], GTA[5]])
def test_same_tensors_in_the_stored_dtype_across_chunks(wide, method, params, top):
    # no dtype: mergekit computes in the inputs' bfloat16 (and the top-k cut falls among equal magnitudes)
    doc = {"merge_method": method, "models": models(wide, **params)}
    if method != "linear":
        doc["base_model"] = str(wide / "base")
    if top:
        doc["parameters"] = top
    theirs, ours = run_both(wide, doc, f"{method}-{len(top)}")
    assert theirs["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert_same(theirs, ours)


def test_out_dtype_casts_what_dtype_computed(wide):
    doc = {"merge_method": "ties", "base_model": str(wide / "base"), "models": models(wide, density=0.5),
           "dtype": "float32", "out_dtype": "float16"}
    theirs, ours = run_both(wide, doc, "ties-out")
    assert ours["lm_head.weight"].dtype == torch.float16
    assert_same(theirs, ours)


def test_the_parity_tests_can_fail(checkpoints):
    # computing TIES in float32 and casting to bf16 (what mixtune did before) is not mergekit's bf16 arithmetic
    doc = {"merge_method": "ties", "base_model": str(checkpoints / "base"), "models": models(checkpoints, density=0.4),
           "dtype": "bfloat16"}
    theirs, _ = run_both(checkpoints, doc, "ties-sensitivity")
    (checkpoints / "f32.yaml").write_text(yaml.safe_dump(doc | {"dtype": "float32", "out_dtype": "bfloat16"}))
    cast = load_file(str(merge(load_merge_config(checkpoints / "f32.yaml"), checkpoints / "f32", overwrite=True)
                         / "model.safetensors"))
    assert sum(torch.equal(cast[k], theirs[k]) for k in theirs) < len(theirs) // 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradients_and_filters_resolve_per_tensor_as_mergekit(checkpoints, dtype):
    # per-layer gradients, filter lists, a model-level filter without a catch-all (falls through to the
    # top level), a numeric gradient of density, and a bool chosen by filter
    doc = {"merge_method": "ties", "base_model": str(checkpoints / "base"), "dtype": dtype,
           "models": [
               {"model": str(checkpoints / "ft0"), "parameters": {"weight": [1.0, 0.2, 0.7], "density": [0.9, 0.2]}},
               {"model": str(checkpoints / "ft1"), "parameters": {
                   "weight": [{"filter": "self_attn", "value": [0.1, 1.0]}, {"filter": "mlp", "value": 0.6}]}},
               {"model": str(checkpoints / "ft2"), "parameters": {"weight": 0.8}},
           ],
           "parameters": {"weight": 0.3, "density": [{"filter": "norm", "value": 1.0}, {"value": 0.5}],
                          "normalize": [{"filter": "down_proj", "value": False}, {"value": True}],
                          "lambda": [1.0, 0.8, 1.2]}}
    assert_same(*run_both(checkpoints, doc, f"ties-gradients-{dtype}"))


SELF_ATTN_MLP = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_slerp_with_the_classic_gradient_config(checkpoints, dtype):
    """mergekit's gradient-slerp example, adapted in its paths: t by layer, per self_attn / mlp."""
    doc = {"merge_method": "slerp", "base_model": str(checkpoints / "base"), "dtype": dtype,
           "slices": [{"sources": [{"model": str(checkpoints / "base"), "layer_range": [0, 4]},
                                   {"model": str(checkpoints / "ft0"), "layer_range": [0, 4]}]}],
           "parameters": {"t": SELF_ATTN_MLP}}
    assert_same(*run_both(checkpoints, doc, f"slerp-slices-{dtype}"))


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_slerp_of_whole_models_and_of_large_tensors(wide, dtype):
    # bf16 as stored, or float32: tensors over mergekit's 1M-entry chunks, t a gradient over the 2 layers
    doc = {"merge_method": "slerp", "base_model": str(wide / "base"),
           "models": [{"model": str(wide / "base")}, {"model": str(wide / "ft1")}], "parameters": {"t": [0.3, 0.9]}}
    if dtype:
        doc["dtype"] = dtype
    assert_same(*run_both(wide, doc, f"slerp-models-{dtype}"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_passthrough_frankenmerge_stacks_layers_and_sets_the_layer_count(checkpoints, dtype):
    doc = {"merge_method": "passthrough", "dtype": dtype,
           "slices": [{"sources": [{"model": str(checkpoints / "ft0"), "layer_range": [0, 3]}]},
                      {"sources": [{"model": str(checkpoints / "ft1"), "layer_range": [1, 4]}]}],
           "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.5},
                                    {"value": 1.0}]}}
    theirs, ours = run_both(checkpoints, doc, f"franken-{dtype}")
    assert_same(theirs, ours)
    ft0 = load_file(str(checkpoints / "ft0" / "model.safetensors"))
    ft1 = load_file(str(checkpoints / "ft1" / "model.safetensors"))
    # output layer 4 is ft1's layer 2 (slice 2 starts at ft1's layer 1); embeddings from ft0, final norm from ft1
    assert torch.equal(ours["model.layers.4.mlp.up_proj.weight"], ft1["model.layers.2.mlp.up_proj.weight"].to(ours[
        "model.layers.4.mlp.up_proj.weight"].dtype))
    assert torch.equal(ours["model.embed_tokens.weight"].float(), ft0["model.embed_tokens.weight"].to(
        ours["model.embed_tokens.weight"].dtype).float())
    assert torch.equal(ours["model.norm.weight"].float(), ft1["model.norm.weight"].to(ours["model.norm.weight"].dtype).float())
    for tool in ("mk", "mx"):
        config = json.loads((checkpoints / f"{tool}-franken-{dtype}" / "config.json").read_text())
        assert config["num_hidden_layers"] == 6 and config["dtype"] == dtype
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoints / f"mx-franken-{dtype}")  # loads: 6 layers, no stray tensor
    assert len(model.model.layers) == 6 and model(torch.tensor([[3, 4, 5]])).logits.isfinite().all()


@pytest.mark.parametrize("dtype,filter_wise", [("float32", False), ("bfloat16", False), ("float32", True)])
def test_model_stock(checkpoints, dtype, filter_wise):
    doc = {"merge_method": "model_stock", "base_model": str(checkpoints / "base"), "dtype": dtype,
           "models": [{"model": str(checkpoints / f"ft{i}")} for i in range(3)],
           "parameters": {"filter_wise": filter_wise}}
    assert_same(*run_both(checkpoints, doc, f"model_stock-{dtype}-{filter_wise}"))


@pytest.mark.parametrize("base,params,dtype", [
    (True, {}, "float32"), (False, {}, "bfloat16"), (True, {"nuslerp_flatten": False}, "bfloat16"),
    (False, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, "float32"),
])
def test_nuslerp(checkpoints, base, params, dtype):
    doc = {"merge_method": "nuslerp", "dtype": dtype, "models": models(checkpoints, n=2)}
    if base:
        doc["base_model"] = str(checkpoints / "base")
    if params:
        doc["parameters"] = params
    assert_same(*run_both(checkpoints, doc, f"nuslerp-{base}-{len(params)}-{dtype}"))


@pytest.mark.parametrize("method,params", [
    ("dare_ties", {"density": 0.3}), ("della", {"density": 0.4, "epsilon": 0.1}),
    ("della_linear", {"density": 0.4, "epsilon": 0.1}),
])
def test_random_methods_match_mergekit_in_distribution(checkpoints, method, params):
    """DARE and DELLA draw from a random stream that mergekit takes from torch's global generator in
    its own tensor order, so single entries cannot match; the statistics must."""
    doc = {"merge_method": method, "base_model": str(checkpoints / "base"), "random_seed": 1,
           "models": models(checkpoints, **params), "dtype": "float32"}
    theirs, ours = run_both(checkpoints, doc, method)
    base = load_file(str(checkpoints / "base" / "model.safetensors"))
    for key in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
        d_theirs, d_ours = theirs[key] - base[key], ours[key] - base[key]
        # share of entries left at the base: no model kept there, or kept ones cancelled by the sign election
        z_theirs, z_ours = (d_theirs == 0).float().mean(), (d_ours == 0).float().mean()
        assert abs(z_theirs - z_ours) < 0.02, key
        assert torch.allclose(d_ours.abs().mean(), d_theirs.abs().mean(), rtol=0.03), key
        assert torch.allclose(d_ours.std(), d_theirs.std(), rtol=0.03), key
