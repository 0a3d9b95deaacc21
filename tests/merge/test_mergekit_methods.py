"""mergekit 0.1.5's newer methods (multislerp, karcher, sce, nearswap, arcee_fusion, ram, ramplus_tl):
values worked by hand, and the tensors mergekit's own ``run_merge`` gives for one YAML, compared with
``torch.equal`` in float32, bfloat16 and float16 (mergekit is a test extra only)."""

import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from mixtune.core import ConfigError
from mixtune.merge import MERGE_METHODS, load_merge_config
from mixtune.merge.compat_select import (NearswapParams, RamParams, RamPlusParams, SceParams, fusion_threshold,
                                         variance_keep)
from mixtune.merge.compat import NoParams
from mixtune.merge.compat_spherical import KarcherParams, MultislerpParams
from mixtune.merge.context import Context
from tests.merge.test_mergekit_parity import assert_same, models, perturbed, run_both

pytestmark = pytest.mark.usefixtures("one_thread")

T = torch.tensor
NEW = ["multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"]


def run(name, params, base, tensors, weights=None):
    return MERGE_METHODS.get(name).fn(base, list(tensors), list(weights or [1.0] * len(tensors)), params, Context())


# -- values worked by hand -----------------------------------------------------------------------

def test_multislerp_by_hand():
    # the weighted mean of the directions, normalised, times the weighted mean norm: with weights summing
    # to 1 the tangent step sum_i w_i (u_i - (u_i . m) m) = M - (M . m) m is 0 (M = sum_i w_i u_i = |M| m)
    e1, e2 = T([2.0, 0.0]), T([0.0, 4.0])
    out = run("multislerp", MultislerpParams(), None, [e1, e2], [3.0, 1.0])  # w = 0.75, 0.25
    direction = T([3.0, 1.0]) / math.sqrt(10)
    assert torch.allclose(out, direction * (0.75 * 2 + 0.25 * 4), atol=1e-6)
    # with a base, of the task vectors: base + the same
    base = T([1.0, -1.0])
    assert torch.allclose(run("multislerp", MultislerpParams(), base, [base + e1, base + e2], [3.0, 1.0]),
                          base + direction * 2.5, atol=1e-6)
    # unnormalised weights scale the norm: sum_i w_i ||x_i|| = 3 * 2 + 1 * 4
    assert torch.allclose(run("multislerp", MultislerpParams(normalize_weights=False), None, [e1, e2], [3.0, 1.0]),
                          direction * 10, atol=1e-5)
    # one model is returned as it is; two antipodal ones with equal weights fall back to w_1 x_1 + w_2 x_2
    assert torch.equal(run("multislerp", MultislerpParams(), base, [e1]), e1)
    assert torch.equal(run("multislerp", MultislerpParams(), None, [e1, -e1]), T([0.0, 0.0]))
    with pytest.raises(ConfigError, match="mean of the models' directions is zero"):
        run("multislerp", MultislerpParams(), None, [e1, -e1, e1, -e1])
    with pytest.raises(ConfigError, match=r"weights \[1.0, -1.0\] sum to 0"):
        run("multislerp", MultislerpParams(), None, [e1, e2], [1.0, -1.0])


def test_karcher_by_hand():
    # directions at 0, 0 and 90 degrees: the Karcher mean on the circle is the mean angle, 30 degrees (the
    # normalised Euclidean mean, where the iteration starts, is at atan(1/2) = 26.6 degrees); the length is
    # the mean norm (1 + 1 + 2) / 3
    e1, e2 = T([1.0, 0.0]), T([0.0, 2.0])
    out = run("karcher", KarcherParams(), None, [e1, e1, e2])
    assert torch.allclose(out, 4 / 3 * T([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)
    start = T([2.0, 1.0]) / math.sqrt(5)  # no iteration: the normalised mean of the directions
    assert torch.allclose(run("karcher", KarcherParams(max_iter=0), None, [e1, e1, e2]), 4 / 3 * start, atol=1e-6)
    # a zero model is left out of the direction but counts in the length: (0 + 1 + 2) / 3 at 45 degrees
    out = run("karcher", KarcherParams(), None, [torch.zeros(2), T([1.0, 0.0]), T([0.0, 2.0])])
    assert torch.allclose(out, T([1.0, 1.0]) / math.sqrt(2), atol=1e-6)
    assert torch.equal(run("karcher", KarcherParams(), None, [torch.zeros(3), torch.zeros(3)]), torch.zeros(3))


def test_sce_by_hand():
    base = T([1.0, 1.0, 1.0, 1.0])
    tau1, tau2 = T([1.0, -2.0, 0.0, 3.0]), T([3.0, 2.0, 0.0, -2.0])
    # calculate: mean squares 14/4 and 17/4, so a = 14/31, 17/31; erase: the sums [4, 0, 0, 1] are all
    # >= 0, so entry 0 takes both (14 * 1 + 17 * 3) / 31, entry 1 only tau2's +2, entry 3 only tau1's 3
    out = run("sce", SceParams(), base, [base + tau1, base + tau2])
    assert torch.allclose(out, base + T([65 / 31, 2.0, 0.0, 3.0]), atol=1e-6)
    # select: population variances [1, 4, 0, 6.25], 3 non-zero, int(3 * 0.5) = 1 kept: entry 3 only
    assert torch.equal(variance_keep(torch.stack([tau1, tau2]), 0.5), T([False, False, False, True]))
    out = run("sce", SceParams(select_topk=0.5), base, [base + tau1, base + tau2])
    assert torch.allclose(out, base + T([0.0, 0.0, 0.0, 3.0]), atol=1e-6)
    assert torch.equal(run("sce", SceParams(select_topk=0.0), base, [base + tau1, base + tau2]), base)


def test_nearswap_by_hand():
    # s = clamp(t / max(|a - b|, 1e-6), 0, 1) = [1, 0.5, 0.1, 1] for t = 0.1; s b + (1 - s) a
    a, b = T([0.0, 0.0, 0.0, 1.0]), T([0.05, 0.2, 1.0, 1.0])
    assert torch.allclose(run("nearswap", NearswapParams(t=0.1), a, [b]), T([0.05, 0.1, 0.1, 1.0]))
    assert torch.equal(run("nearswap", NearswapParams(t=0.0), a, [b]), a)


def test_arcee_fusion_by_hand():
    # a 1-D tensor has one KL term c > 0, so the importance is c |tau|: quartile ranks int(q * 9) = 2, 4, 6
    # of |tau| = 0..8, 100 give 2, 4, 6 and the threshold 4 + 1.5 * (6 - 2) = 10: only the outlier is taken
    base = torch.zeros(10, dtype=torch.float64)
    tau = T([0, 1, 2, 3, 4, 5, 6, 7, 8, 100], dtype=torch.float64).flip(0)
    out = run("arcee_fusion", NoParams(), base, [base + tau])
    assert torch.equal(out, T([100] + [0] * 9, dtype=torch.float64))
    # the mask is float32, so bf16 inputs give float32, as mergekit's
    assert run("arcee_fusion", NoParams(), base.bfloat16(), [(base + tau).bfloat16()]).dtype == torch.float32
    assert float(fusion_threshold(T([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 100]), torch.Generator())) == 10.0


def test_ram_and_ramplus_by_hand():
    base = torch.zeros(5)
    taus = [T([0.0, 1.0, 2.0, 6.0, 1e-6]), T([0.0, 3.0, 0.0, 0.0, 0.0]), T([0.0, 2.0, 0.0, 0.0, 4.0])]
    # changed (|tau| > 1e-5) by [0, 3, 1, 1, 1] models: entry 1 the mean (1 + 3 + 2) / 3, entries 2 and 3
    # tau1's, entry 4 tau3's (tau1's 1e-6 does not count)
    assert torch.allclose(run("ram", RamParams(), base, taus), T([0.0, 2.0, 2.0, 6.0, 4.0]))
    # RAM+: rho = shared / unique = 1/2, 1/1e-5, 1/1; lambda = 1 + 0.5 clip(rho, 0, 0.8) = 1.25, 1.4, 1.4
    # scales the unique entries only
    out = run("ramplus_tl", RamPlusParams(r=0.5, alpha=0.8), base, taus)
    assert torch.allclose(out, T([0.0, 2.0, 2.5, 7.5, 5.6]))
    assert run("ramplus_tl", RamPlusParams(), base.bfloat16(), [t.bfloat16() for t in taus]).dtype == torch.float32


def test_fusion_threshold_of_large_tensors_is_sampled_as_mergekit_samples_it():
    # over 1M entries both draw 1M with replacement; the thresholds agree in distribution, not exactly
    from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion

    g = torch.Generator().manual_seed(0)
    score = torch.randn(1_500_000, generator=g).abs()
    exact = fusion_threshold(score[:1_000_000], g)  # the same rule on 1M entries of the same law
    torch.manual_seed(0)
    theirs = float(DynamicThresholdFusion().calculate_dynamic_threshold(score))
    ours = float(fusion_threshold(score, torch.Generator().manual_seed(1)))
    assert abs(ours - theirs) / theirs < 0.005 and abs(ours - float(exact)) / float(exact) < 0.005


# -- the same tensors as mergekit ----------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_dir):
    """The built-in tiny model as a float32 base and three densely perturbed 'fine-tunes'."""
    return perturbed(tiny_dir, tmp_path_factory.mktemp("methods"), torch.float32)


@pytest.fixture(scope="module")
def sparse(tmp_path_factory, tiny_dir):
    """The tiny model and three 'fine-tunes' that each change a random 30% of every tensor (RL-like
    sparse task vectors), so RAM meets unchanged, unique and shared entries."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("sparse")
    AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).save_pretrained(root / "base")
    g = torch.Generator().manual_seed(3)
    for i in range(3):
        ft = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g) * (torch.rand(p.shape, generator=g) < 0.3))
        ft.save_pretrained(root / f"ft{i}")
    return root


def plain(root, n):
    return [{"model": str(root / f"ft{i}")} for i in range(n)]


DTYPES = ["float32", "bfloat16", "float16"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp(checkpoints, dtype, with_base):
    doc = {"merge_method": "multislerp", "dtype": dtype, "models": models(checkpoints)}
    if with_base:
        doc["base_model"] = str(checkpoints / "base")
    assert_same(*run_both(checkpoints, doc, f"multislerp-{with_base}-{dtype}"))


def test_multislerp_unnormalised_of_two(checkpoints):
    doc = {"merge_method": "multislerp", "dtype": "bfloat16", "models": models(checkpoints, n=2),
           "base_model": str(checkpoints / "base"), "parameters": {"normalize_weights": False}}
    assert_same(*run_both(checkpoints, doc, "multislerp-raw"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_karcher(checkpoints, dtype):
    doc = {"merge_method": "karcher", "dtype": dtype, "models": plain(checkpoints, 3)}
    assert_same(*run_both(checkpoints, doc, f"karcher-{dtype}"))


def test_the_comparisons_can_fail(checkpoints):
    # karcher computed in float32 on the bf16-rounded inputs, then rounded, is not mergekit's bf16 arithmetic
    doc = {"merge_method": "karcher", "dtype": "bfloat16", "models": plain(checkpoints, 3)}
    theirs, ours = run_both(checkpoints, doc, "karcher-control")
    fts = [load_file(str(checkpoints / f"ft{i}" / "model.safetensors")) for i in range(3)]
    same = 0
    for key in theirs:
        f32 = run("karcher", KarcherParams(), None, [ft[key].bfloat16().float() for ft in fts])
        same += torch.equal(f32.bfloat16(), theirs[key])
    assert same < len(theirs) // 2
    assert_same(theirs, ours)


def test_karcher_counts_the_base_as_a_model_and_takes_its_parameters(checkpoints):
    # mergekit adds a base_model the models do not list as one more input of the mean
    doc = {"merge_method": "karcher", "dtype": "bfloat16", "base_model": str(checkpoints / "base"),
           "models": plain(checkpoints, 2), "parameters": {"max_iter": 3, "tol": 1e-4}}
    theirs, ours = run_both(checkpoints, doc, "karcher-base")
    assert_same(theirs, ours)
    cfg = load_merge_config(checkpoints / "karcher-base.yaml")
    assert [m.model.name for m in cfg.models] == ["ft0", "ft1", "base"]


@pytest.mark.parametrize("dtype,topk", [("float32", 1.0), ("bfloat16", 1.0), ("float32", 0.3), ("bfloat16", 0.3),
                                        ("float16", 0.3)])
def test_sce(checkpoints, dtype, topk):
    doc = {"merge_method": "sce", "dtype": dtype, "base_model": str(checkpoints / "base"),
           "models": plain(checkpoints, 3), "parameters": {"select_topk": topk, "int8_mask": dtype == "float16"}}
    assert_same(*run_both(checkpoints, doc, f"sce-{topk}-{dtype}"))


@pytest.mark.parametrize("dtype,t", [("float32", 0.01), ("bfloat16", 0.01), ("float16", 0.01),
                                     ("bfloat16", [{"filter": "mlp", "value": [0.001, 0.03]}, {"value": 0.01}])])
def test_nearswap(checkpoints, dtype, t):
    doc = {"merge_method": "nearswap", "dtype": dtype, "base_model": str(checkpoints / "base"),
           "models": plain(checkpoints, 1), "parameters": {"t": t}}
    assert_same(*run_both(checkpoints, doc, f"nearswap-{dtype}-{isinstance(t, list)}"))


@pytest.mark.parametrize("method,params", [("arcee_fusion", {}), ("ramplus_tl", {"r": 0.3, "alpha": 0.5})])
@pytest.mark.parametrize("dtype", DTYPES)
def test_methods_that_return_float32(sparse, method, params, dtype):
    # mergekit's float32 masks make these float32 for half inputs; with out_dtype both tools write the same
    # cast, without it mergekit writes the float32 and mixtune its rounding to dtype
    n = 1 if method == "arcee_fusion" else 3
    doc = {"merge_method": method, "dtype": dtype, "base_model": str(sparse / "base"), "models": plain(sparse, n),
           "parameters": params}
    if dtype != "float32":
        theirs, ours = run_both(sparse, doc, f"{method}-{dtype}")
        assert {t.dtype for t in theirs.values()} == {torch.float32}
        assert_same({k: t.to(ours[k].dtype) for k, t in theirs.items()}, ours)
        doc["out_dtype"] = dtype
    assert_same(*run_both(sparse, doc, f"{method}-{dtype}-out"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ram(sparse, dtype):
    doc = {"merge_method": "ram", "dtype": dtype, "base_model": str(sparse / "base"), "models": plain(sparse, 3)}
    theirs, ours = run_both(sparse, doc, f"ram-{dtype}")
    assert_same(theirs, ours)
    # the fixture meets all three cases: some entries unchanged, some changed by one model only
    base = load_file(str(sparse / "base" / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    changed = ours["model.layers.0.mlp.up_proj.weight"].float() != base.to(ours["model.layers.0.mlp.up_proj.weight"]
                                                                          .dtype).float()
    assert 0.2 < changed.float().mean() < 0.8


# -- configs and the CLI -------------------------------------------------------------------------

def test_each_method_is_a_mergekit_method_and_passes_a_dry_run(checkpoints):
    from mixtune.cli import app

    params = {"nearswap": {"t": 0.001}}
    for name in NEW:
        spec = MERGE_METHODS.get(name)
        assert spec.mergekit
        n = 1 if spec.n_models[1] == 1 else 2
        doc = {"merge_method": name, "dtype": "bfloat16",
               "models": models(checkpoints, n=n) if spec.weighted else plain(checkpoints, n)}
        if spec.needs_base or spec.optional_base:
            doc["base_model"] = str(checkpoints / "base")
        if name in params:
            doc["parameters"] = params[name]
        path = checkpoints / f"dry-{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        result = CliRunner().invoke(app, ["merge", str(path), "--dry-run"])
        assert result.exit_code == 0, (name, result.output)
        assert result.output.startswith(f"{name}: 38 tensors"), result.output
    listing = CliRunner().invoke(app, ["merge", "--list"]).output
    for name in NEW:
        assert f"\n{name}" in listing
    assert "parameters.t = (required)" in listing and "parameters.select_topk = 1.0" in listing


def test_unweighted_methods_refuse_weights_and_nearswap_needs_t(checkpoints):
    doc = {"merge_method": "sce", "base_model": "base", "models": [{"model": "ft0", "parameters": {"weight": 1}}]}
    (checkpoints / "sce-w.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"models\[0\].parameters.weight: sce takes no weights"):
        load_merge_config(checkpoints / "sce-w.yaml")
    from mixtune.merge.run import resolve

    doc = {"merge_method": "nearswap", "base_model": "base", "models": [{"model": "ft0"}]}
    (checkpoints / "ns.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"\bt\b"):
        resolve(load_merge_config(checkpoints / "ns.yaml"), checkpoints)
