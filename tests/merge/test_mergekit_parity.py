"""A mergekit YAML run through mixtune gives the tensors mergekit 0.1.5 gives (mergekit is a test
extra only: it is LGPL and never imported by mixtune itself)."""

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mixtune.merge import load_merge_config, merge


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_dir):
    """The built-in tiny model as a float32 base and three perturbed 'fine-tunes' of it."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("parity")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        ft = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        ft.save_pretrained(root / f"ft{i}")
    return root


def run_both(root, doc, name):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    (root / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    run_merge(MergeConfiguration.model_validate(doc), str(root / f"mk-{name}"),
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=False))
    merge(load_merge_config(root / f"{name}.yaml"), root / f"mx-{name}")
    theirs = load_file(str(root / f"mk-{name}" / "model.safetensors"))
    ours = load_file(str(root / f"mx-{name}" / "model.safetensors"))
    return theirs, ours


def models(root, **params):
    return [{"model": str(root / f"ft{i}"), "parameters": {"weight": w} | params}
            for i, w in enumerate([1.0, 0.5, 0.8])]


@pytest.mark.parametrize("method,params,top", [
    ("linear", {}, {}),
    ("task_arithmetic", {}, {"lambda": 0.7}),
    ("ties", {"density": 0.4}, {}),
    ("ties", {"density": 0.4}, {"normalize": False, "lambda": 0.9}),
    ("breadcrumbs", {"density": 0.3, "gamma": 0.05}, {}),
    ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.05}, {}),
])
def test_same_tensors_as_mergekit(checkpoints, method, params, top):
    doc = {"merge_method": method, "models": models(checkpoints, **params), "dtype": "float32"}
    if method != "linear":
        doc["base_model"] = str(checkpoints / "base")
    if top:
        doc["parameters"] = top
    theirs, ours = run_both(checkpoints, doc, f"{method}-{len(top)}")
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.allclose(ours[key], theirs[key], rtol=0, atol=1e-6), key


def test_dare_ties_matches_mergekit_in_distribution(checkpoints):
    """DARE draws from a random stream that mergekit takes from torch's global generator in its own
    tensor order, so single entries cannot match; the statistics must."""
    doc = {"merge_method": "dare_ties", "base_model": str(checkpoints / "base"), "random_seed": 1,
           "models": models(checkpoints, density=0.3), "dtype": "float32"}
    theirs, ours = run_both(checkpoints, doc, "dare_ties")
    base = load_file(str(checkpoints / "base" / "model.safetensors"))
    for key in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
        d_theirs, d_ours = theirs[key] - base[key], ours[key] - base[key]
        # share of entries left at the base: no model kept there, or kept ones cancelled by the sign election
        z_theirs, z_ours = (d_theirs == 0).float().mean(), (d_ours == 0).float().mean()
        assert abs(z_theirs - z_ours) < 0.02, key
        assert torch.allclose(d_ours.abs().mean(), d_theirs.abs().mean(), rtol=0.03), key
        assert torch.allclose(d_ours.std(), d_theirs.std(), rtol=0.03), key
