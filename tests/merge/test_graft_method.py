"""The ``graft`` merge (grafted specialists, Panigrahi et al., 2023) on tensors worked by hand, through the merge engine."""

import json

import torch
from safetensors.torch import load_file, save_file

from mixtune.merge import MERGE_METHODS, MergeConfig, merge
from mixtune.merge.methods import GraftParams, top_mask
from mixtune.merge.run import merge_tensors

T = torch.tensor
BASE = {"a": T([1.0, 1, 1, 1]), "b": T([-1.0, -1, -1, -1])}
TAU1 = {"a": T([4.0, -1, 0, 2]), "b": T([-3.0, 1, 5, -2])}
TAU2 = {"a": T([0.0, 3, 0, 1]), "b": T([2.0, 0, -4, 6])}
M1 = {k: BASE[k] + TAU1[k] for k in BASE}
M2 = {k: BASE[k] + TAU2[k] for k in BASE}


def params(**kw):
    return GraftParams(**kw)


def merge_dicts(p, base, models, weights=None, seed=0):
    """The file-free merge path: whole-model statistics (scope global) included."""
    keys = list(models[0])
    load = lambda k: [base[k]] + [m[k] for m in models]
    out = merge_tensors(MERGE_METHODS.get("graft"), p, [], list(weights or [1.0] * len(models)), keys, load,
                        sizes={k: models[0][k].numel() for k in keys}, has_base=True, seed=seed)
    return dict(out)


def test_top_mask_keeps_the_top_k_and_every_tie_at_the_cut_but_no_zero():
    # n = 4, k = int(0.25 * 4) = 1: the largest |x| is 2, held twice: both kept
    assert top_mask(T([[2.0, -2, 1, 0]]), 0.25, "per_tensor").tolist() == [[True, True, False, False]]
    # k = max(1, int(0.1 * 4)) = 1 however small the density; density 1 keeps the non-zero entries
    assert top_mask(T([[0.5, -3, 1, 0]]), 0.1, "per_tensor").tolist() == [[False, True, False, False]]
    assert top_mask(T([[0.5, -3, 1, 0]]), 1.0, "per_tensor").tolist() == [[True, True, True, False]]
    # per row of 2, k = 1 in each
    assert top_mask(T([[[1.0, 2], [4, 3]]]), 0.5, "per_row").tolist() == [[[False, True], [True, False]]]


def test_global_scope_picks_each_models_top_over_the_whole_model():
    # n = 8, k = int(0.25 * 8) = 2 per model. tau1: |5| (b[2]) and |4| (a[0]); tau2: |6| (b[3]) and |-4| (b[2]).
    # b[2] is grafted by both: the mean (5 - 4) / 2 = 0.5. merged tau: a = (4, 0, 0, 0), b = (0, 0, 0.5, 6)
    out = merge_dicts(params(density=0.25), BASE, [M1, M2])
    assert torch.equal(out["a"], T([5.0, 1, 1, 1])) and torch.equal(out["b"], T([-1.0, -1, -0.5, 5]))
    # weights (1, 0.5): the overlap is (1 * 5 + 0.5 * -4) / 2 = 1.5, model 2 alone gives 0.5 * 6 = 3
    out = merge_dicts(params(density=0.25), BASE, [M1, M2], weights=[1.0, 0.5])
    assert torch.equal(out["a"], T([5.0, 1, 1, 1])) and torch.equal(out["b"], T([-1.0, -1, 0.5, 2]))


def test_per_tensor_scope_picks_each_tensors_top():
    # n = 4, k = 1 per tensor and model: tau1 keeps a[0] = 4, b[2] = 5; tau2 keeps a[1] = 3, b[3] = 6;
    # no overlap, so merged tau a = (4, 3, 0, 0), b = (0, 0, 5, 6); lambda 0.5 halves it
    out = merge_dicts(params(density=0.25, scope="per_tensor"), BASE, [M1, M2])
    assert torch.equal(out["a"], T([5.0, 4, 1, 1])) and torch.equal(out["b"], T([-1.0, -1, 4, 5]))
    half = merge_dicts(params(density=0.25, scope="per_tensor", **{"lambda": 0.5}), BASE, [M1, M2])
    assert torch.equal(half["a"], T([3.0, 2.5, 1, 1])) and torch.equal(half["b"], T([-1.0, -1, 1.5, 2]))


def test_an_entry_a_model_did_not_change_does_not_count_in_the_overlap():
    # density 1: tau1 a = (4, -1, 0, 2) and tau2 a = (0, 3, 0, 1): a[0] only tau1 -> 4; a[1] (-1 + 3) / 2 = 1;
    # a[2] nobody -> the base; a[3] (2 + 1) / 2 = 1.5
    out = merge_dicts(params(density=1.0), BASE, [M1, M2])
    assert torch.equal(out["a"], T([5.0, 2, 1, 2.5]))


def test_one_model_at_density_one_is_the_fine_tuned_model_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"x.weight": torch.randn(5, 7, generator=g), "x.bias": torch.randn(7, generator=g)}
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    for scope in ("global", "per_tensor", "per_row"):
        out = merge_dicts(params(density=1.0, scope=scope), base, [ft])
        assert all(torch.equal(out[k], ft[k]) for k in ft), scope
    # the same through merge() on checkpoint folders
    for name, sd in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cfg = MergeConfig(method="graft", base_model=tmp_path / "base", models=[{"model": tmp_path / "ft"}],
                      parameters={"density": 1.0})
    got = load_file(str(merge(cfg, tmp_path / "out") / "model.safetensors"))
    assert all(torch.equal(got[k], ft[k]) for k in ft)
    # the default density 0.01 of 42 entries keeps the largest |tau| alone; the rest is the base, exactly
    sparse = merge_dicts(params(), base, [ft])
    changed = sum(int((sparse[k] != base[k]).sum()) for k in base)
    assert changed == 1
