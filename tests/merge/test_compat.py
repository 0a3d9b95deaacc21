"""mergekit's methods, settings and slices on values worked by hand (parity with mergekit itself is in
test_mergekit_parity.py)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtune.core import CheckpointError, ConfigError
from mixtune.merge import MERGE_METHODS, MergeConfig, merge
from mixtune.merge.compat import ModelStockParams, NuslerpParams, PassthroughModelParams, SlerpParams
from mixtune.merge.context import Context
from mixtune.merge.plan import with_layer
from mixtune.merge.settings import check, evaluate, layer_fraction

T = torch.tensor


def run(name, params, base, models, weights=None, per_model=None):
    ctx = Context(per_model=per_model or [])
    return MERGE_METHODS.get(name).fn(base, list(models), list(weights or [1.0] * len(models)), params, ctx)


# -- settings ------------------------------------------------------------------------------------

def test_gradients_interpolate_over_the_layers_as_mergekit():
    # [0, 0.5, 0.3, 0.7, 1] at t = 0.6: s = 0.6 * 4 = 2.4, between v[2] = 0.3 and v[3] = 0.7: 0.6 * 0.3 + 0.4 * 0.7
    assert evaluate([0, 0.5, 0.3, 0.7, 1], "x", 0.6) == pytest.approx(0.46)
    assert evaluate([0, 0.5, 0.3, 0.7, 1], "x", 1.0) == 1.0 and evaluate([2, 4], "x", 0.0) == 2.0
    assert evaluate([True, False, True], "x", 0.6) is False  # discrete: values[int(0.6 * 2)] = values[1]
    # t of the i-th of n layers: i / (n - 1); one layer 1; outside the layers 0
    assert [layer_fraction(i, 5) for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert layer_fraction(0, 1) == 1.0 and layer_fraction(None, 5) == 0.0


def test_filters_take_the_first_substring_match_and_may_match_nothing():
    t = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.7}, {"value": 0.5}]
    assert evaluate(t, "model.layers.3.self_attn.q_proj.weight", 0.25) == 0.25
    assert evaluate(t, "model.layers.3.mlp.up_proj.weight", 0.25) == 0.7
    assert evaluate(t, "model.embed_tokens.weight", 0.0) == 0.5
    assert evaluate([{"filter": "mlp", "value": 1}], "model.norm.weight") is None  # falls to the next level
    assert evaluate({"filter": "*", "value": 3}, "anything") == 3
    assert check(t, "t") == [0, 1, 0.7, 0.5]
    with pytest.raises(ConfigError, match=r"t\[1\] = \{'filtr': 'mlp', 'value': 1\}: expected \{filter"):
        check([{"filter": "a", "value": 1}, {"filtr": "mlp", "value": 1}], "t")


# -- methods on hand values ----------------------------------------------------------------------

def test_slerp_by_hand():
    # orthogonal unit vectors: theta = pi / 2, at t = 0.5 both coefficients are sin(pi / 4) / 1
    out = run("slerp", SlerpParams(t=0.5), T([1.0, 0.0]), [T([0.0, 1.0])])
    assert torch.allclose(out, T([math.sqrt(0.5), math.sqrt(0.5)]))
    # t = 0 is the base, t = 1 the other model; lengths are interpolated, not normalised away
    assert torch.allclose(run("slerp", SlerpParams(t=1.0), T([2.0, 0.0]), [T([0.0, 3.0])]), T([0.0, 3.0]), atol=1e-6)
    # nearly collinear (|cos| > 0.9995): the linear interpolation (1 - t) a + t b
    a, b = T([1.0, 0.0, 0.0]), T([2.0, 0.001, 0.0])
    assert torch.equal(run("slerp", SlerpParams(t=0.25), a, [b]), 0.75 * a + 0.25 * b)
    assert run("slerp", SlerpParams(t=0.5), a.bfloat16(), [b.bfloat16()]).dtype == torch.bfloat16


def test_nuslerp_weights_give_t_and_a_base_makes_it_a_slerp_of_task_vectors():
    # weights 1 and 3: t = 3 / 4; orthogonal unit vectors: sin(pi/8) a + sin(3 pi/8) b
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    out = run("nuslerp", NuslerpParams(), None, [a, b], weights=[1.0, 3.0])
    assert torch.allclose(out, T([math.sin(math.pi / 8), math.sin(3 * math.pi / 8)]))
    base = T([5.0, 5.0])
    assert torch.allclose(run("nuslerp", NuslerpParams(), base, [base + a, base + b], weights=[1.0, 3.0]), base + out)


def test_model_stock_by_hand():
    # two task vectors at 90 degrees: cos = 0, t = 2 * 0 / (1 + 0) = 0, so the base
    base = T([1.0, 1.0])
    assert torch.equal(run("model_stock", ModelStockParams(), base, [base + T([1.0, 0]), base + T([0, 1.0])]), base)
    # at 60 degrees (cos 1/2): t = 2 * 0.5 / 1.5 = 2/3 of the way from the base to the models' mean
    m1, m2 = base + T([1.0, 0.0]), base + T([0.5, math.sqrt(3) / 2])
    want = (2 / 3) * (m1 + m2) / 2 + (1 / 3) * base
    assert torch.allclose(run("model_stock", ModelStockParams(), base, [m1, m2]), want)
    # filter-wise: one ratio per row; row 0 as above (cos 1/2), row 1 with equal task vectors (cos 1, t = 1)
    rows = run("model_stock", ModelStockParams(filter_wise=True), torch.stack([base, base]),
               [torch.stack([m1, base + 1]), torch.stack([m2, base + 1])])
    assert torch.allclose(rows, torch.stack([want, base + 1]))


def test_passthrough_copies_or_scales():
    x = T([1.0, -2.0])
    assert run("passthrough", None, None, [x]) is x
    assert torch.equal(run("passthrough", None, None, [x], per_model=[PassthroughModelParams(scale=0.5)]), x * 0.5)


# -- slices, in mixtune's form -------------------------------------------------------------------

def write(folder, layers, value, width=2):
    folder.mkdir(parents=True)
    t = {"model.embed_tokens.weight": torch.full((3, width), value), "model.norm.weight": torch.full((width,), value)}
    for i in range(layers):
        t[f"model.layers.{i}.mlp.weight"] = torch.full((width, width), value + i / 10)
    save_file(t, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    return folder


def test_slices_stack_layer_ranges_with_embeddings_first_and_norm_last(tmp_path):
    a, b = write(tmp_path / "a", 3, 1.0), write(tmp_path / "b", 4, 2.0)
    cfg = MergeConfig(method="passthrough", slices=[
        {"sources": [{"model": a, "layer_range": [1, 3]}]},
        {"sources": [{"model": b, "layer_range": [0, 2]}], "parameters": {"scale": [{"filter": "mlp", "value": 2}]}},
    ], dtype="float32")
    out = merge(cfg, tmp_path / "out")
    got = load_file(str(out / "model.safetensors"))
    # a's layers 1, 2 become 0, 1; b's layers 0, 1 become 2, 3, their mlp scaled by 2 (the norm matches no filter)
    assert [got[f"model.layers.{i}.mlp.weight"][0, 0].item() for i in range(4)] == pytest.approx([1.1, 1.2, 4.0, 4.2])
    assert got["model.embed_tokens.weight"][0, 0] == 1.0 and got["model.norm.weight"][0] == 2.0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert with_layer("model.layers.12.experts.3.w", 7) == "model.layers.7.experts.3.w"


@pytest.mark.parametrize("change,error,match", [
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 5]}]}]}, ConfigError,
     r"slices\[0\]\.sources\[0\]\.layer_range \[0, 5\]: a has layers 0\.\.2"),
    ({"method": "slerp", "base_model": "a", "parameters": {"t": 0.5},
      "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}]},
     ConfigError, r"slices\[0\]: its sources span \[2, 3\] layers"),
    ({"method": "slerp", "base_model": "c", "parameters": {"t": 0.5},
      "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]}]},
     ConfigError, r"slices\[0\]: its base model c is not among its sources"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]}]},
     ConfigError, r"slices\[0\]: passthrough merges exactly 1 model\(s\) besides the base; the slice has 2"),
    ({"method": "ties_paper", "base_model": "a", "parameters": {"density": [0.1, 0.5]},
      "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]}]},
     ConfigError, r"parameters\.density: gradients and filters are for mergekit's methods"),
    ({"method": "slerp", "base_model": "a", "parameters": {"t": [0, "x"]},
      "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]}]},
     ConfigError, r"parameters for slerp: t: Input should be a valid number"),
])
def test_bad_slices_fail_naming_the_slice(tmp_path, change, error, match):
    write(tmp_path / "a", 3, 1.0), write(tmp_path / "b", 4, 2.0), write(tmp_path / "c", 3, 0.0)
    cfg = MergeConfig.model_validate({"method": "passthrough"} | change)
    with pytest.raises(error, match=match):
        merge(cfg, tmp_path / "out", base_dir=tmp_path)
    assert not (tmp_path / "out").exists()


def test_a_slice_source_lacking_a_tensor_names_it(tmp_path):
    a = write(tmp_path / "a", 2, 1.0)
    b = write(tmp_path / "b", 2, 2.0)
    t = load_file(str(b / "model.safetensors"))
    del t["model.layers.1.mlp.weight"]
    t["model.layers.1.other.weight"] = torch.zeros(2, 2)
    save_file(t, str(b / "model.safetensors"))
    cfg = MergeConfig(method="slerp", base_model=a, parameters={"t": 0.5}, slices=[
        {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]}])
    with pytest.raises(CheckpointError, match=r"b: lacks tensor model.layers.1.mlp.weight that slices\[0\] takes"):
        merge(cfg, tmp_path / "out")


def test_check_merge_plans_slices_of_models_of_different_depths(tmp_path):
    from mixtune.merge.run import check_inputs, check_merge, open_inputs

    a, b = write(tmp_path / "a", 3, 1.0), write(tmp_path / "b", 4, 2.0)
    cfg = MergeConfig(method="passthrough", slices=[{"sources": [{"model": a, "layer_range": [0, 2]}]},
                                                    {"sources": [{"model": b, "layer_range": [1, 4]}]}])
    assert check_merge(cfg) == 2 + 5  # embeddings and norm, five layers
    inputs = open_inputs(None, [a, b])
    with pytest.raises(CheckpointError, match="model.layers.3.mlp.weight"):  # what a models: merge would need
        check_inputs(inputs[0], inputs[1:])
    for r in inputs:
        r.close()


def test_della_keeps_each_rank_with_its_probability():
    """MagPrune (arXiv:2406.11617, Sec. 3; mergekit/sparsify.py:137-174): in each row the entry of ascending
    magnitude rank r of n is kept with probability (d - eps) + 2 eps r / (n - 1); rows drawn a block at a time,
    half precision ranked by its bit patterns."""
    from mixtune.merge.compat import della_keep

    n, d, eps = 5, 0.5, 0.2
    row = torch.tensor([0.3, -0.1, 0.5, -0.2, 0.4])  # ranks 2, 0, 4, 1, 3
    want = torch.tensor([(d - eps) + 2 * eps * r / (n - 1) for r in (2, 0, 4, 1, 3)])
    for dtype in (torch.float32, torch.bfloat16):
        rows = row.to(dtype).repeat(400_000, 1)  # 2M entries: several blocks of rows
        keep = della_keep(rows, d, eps, torch.Generator().manual_seed(0))
        assert keep.shape == rows.shape
        assert torch.allclose(keep.float().mean(0), want, atol=3e-3), dtype


def test_threaded_masks_repeat_exactly(monkeypatch):
    """Several models' masks are found on threads above a million entries; the merge is the same as on one
    thread, and DELLA, which draws from the tensor's generator, repeats its draws exactly run after run."""
    from mixtune.merge.compat import MergekitModelParams, MergekitParams

    g = torch.Generator().manual_seed(0)
    base = torch.randn(1100, 1000, generator=g).bfloat16()
    models = [(base.float() + 0.02 * torch.randn(base.shape, generator=g)).bfloat16() for _ in range(3)]
    per_model = [MergekitModelParams(density=0.5, epsilon=0.1)] * 3
    for name in ("ties", "breadcrumbs", "della"):
        def once(threads):
            monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
            ctx = Context(key="k", rng=torch.Generator().manual_seed(7), per_model=per_model)
            return MERGE_METHODS.get(name).fn(base, models, [1.0] * 3, MergekitParams(), ctx)
        first = once(2)
        assert torch.equal(first, once(2)) and torch.equal(first, once(1)), name
