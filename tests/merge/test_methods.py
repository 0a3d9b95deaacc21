"""Each merge method against values computed by hand on 3x4 tensors (worked in the comments)."""

import pytest
import torch

from mixtune.merge.compat import LinearParams, MergekitModelParams, MergekitParams, mergekit_sparsify
from mixtune.merge.context import Context
from mixtune.merge.methods import (
    MERGE_METHODS,
    BreadcrumbsParams,
    DareParams,
    DareTiesParams,
    TiesParams,
    breadcrumbs_mask,
    dare_drop,
    elect_sign,
    trim_mask,
)
from mixtune.merge.run import merge_tensors

T = torch.tensor
BASE = T([[0.0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2]])
TAU1 = T([[4.0, -1, 0, 2], [-3, 1, 5, -2], [1, 0, -6, 3]])
TAU2 = T([[-2.0, -3, 1, 2], [3, 2, -1, 0], [0, -4, 2, -1]])
M1, M2 = BASE + TAU1, BASE + TAU2


def run(name, params, base=BASE, models=(M1, M2), weights=(1.0, 1.0), seed=0):
    ctx = Context(rng=torch.Generator().manual_seed(seed))
    return MERGE_METHODS.get(name).fn(base, list(models), list(weights), params, ctx)


def merge_dicts(name, params, base, models, weights=None, seed=0, per_model=None):
    """The file-free merge path: whole-model statistics (scope global) included."""
    method = MERGE_METHODS.get(name)
    keys = list(models[0])
    load = lambda k: ([base[k]] if base is not None else []) + [m[k] for m in models]
    out = merge_tensors(method, params, per_model or [], list(weights or [1.0] * len(models)), keys, load,
                        sizes={k: models[0][k].numel() for k in keys}, has_base=base is not None, seed=seed)
    return dict(out)


def test_linear_is_the_weighted_mean_or_sum():
    # weights 1 and 3: (M1 + 3 M2) / 4, e.g. row 0: ([4,-1,0,2] + 3[-2,-3,1,2]) / 4 = [-0.5, -2.5, 0.75, 2]
    out = run("linear", LinearParams(), base=None, weights=(1.0, 3.0))
    assert torch.allclose(out[0], T([-0.5, -2.5, 0.75, 2.0]))
    assert torch.allclose(run("linear", LinearParams(normalize=False), base=None, weights=(1.0, 3.0)), M1 + 3 * M2)


def test_task_arithmetic_by_hand():
    # tau1 + tau2 = [[2,-4,1,4],[0,3,4,-2],[1,-4,-4,2]]; x 0.5 + base
    out = run("task_arithmetic", MergekitParams(**{"lambda": 0.5}))
    assert torch.equal(out, T([[1.0, -2, 0.5, 2], [1, 2.5, 3, 0], [2.5, 0, 0, 3]]))
    # a negative weight subtracts a task: base + tau1 - tau2
    assert torch.equal(run("task_arithmetic", MergekitParams(), weights=(1.0, -1.0)), BASE + TAU1 - TAU2)


def test_trim_keeps_magnitudes_at_or_above_the_official_threshold():
    # n = 12, k = int(0.25 * 12) = 3: threshold = 9th smallest |tau1| = 3 (sorted 0,0,1,1,1,2,2,3,3,4,5,6);
    # |x| >= 3 keeps 4, -3, 5, -6, 3 (the tie at 3 is kept)
    assert torch.equal(TAU1 * trim_mask(TAU1[None], 0.25, "per_tensor")[0], T([[4.0, 0, 0, 0], [-3, 0, 5, 0], [0, 0, -6, 3]]))
    # per row, n = 4, k = int(0.5 * 4) = 2: threshold = 2nd smallest |x| of each row (1, 2, 1), so
    # k + 1 = 3 entries survive per row, as in the official code
    assert torch.equal(TAU1 * trim_mask(TAU1[None], 0.5, "per_row")[0], T([[4.0, -1, 0, 2], [-3, 0, 5, -2], [1, 0, -6, 3]]))
    assert trim_mask(TAU1[None], 1.0, "per_tensor").all()


def test_elect_sign_breaks_zero_sums_with_the_majority():
    taus = torch.stack([T([1.0, -2, 3, 0]), T([-1.0, -1, 1, 0])])  # sums 0, -3, 4, 0 -> signs 0, -1, 1, 0
    assert torch.equal(elect_sign(taus), T([1.0, -1, 1, 1]))  # majority sign(0 - 1 + 1 + 0) = 0 -> +1
    taus = torch.stack([T([1.0, -2, -3, 0]), T([-1.0, -1, 1, 0])])  # signs 0, -1, -1, 0 -> majority -1
    assert torch.equal(elect_sign(taus), T([-1.0, -1, -1, -1]))


def test_ties_paper_by_hand():
    # trimmed (density 0.25, per tensor): tau1 -> [[4,0,0,0],[-3,0,5,0],[0,0,-6,3]]
    #                                     tau2 -> [[-2,-3,0,2],[3,2,0,0],[0,-4,2,0]] (threshold 2)
    # sum [[2,-3,0,2],[0,2,5,0],[0,-4,-4,3]]; sign, zeros -> majority (+1):
    # gamma [[1,-1,1,1],[1,1,1,1],[1,-1,-1,1]]; agreeing mean:
    # [[4,-3,0,2],[3,2,5,0],[0,-4,-6,3]]
    out = run("ties_paper", TiesParams(density=0.25, scope="per_tensor"))
    assert torch.equal(out, BASE + T([[4.0, -3, 0, 2], [3, 2, 5, 0], [0, -4, -6, 3]]))
    # weights: the agreeing entries' weighted mean, sum w tau m / sum w m (the count mean when all w = 1);
    # with weights 1 and 3 and no trim, entry (0,0): 1*4 + 3*(-2) = -2, so gamma = -1 and only
    # tau2 agrees: 3*(-2) / 3 = -2
    out = run("ties_paper", TiesParams(density=1.0, scope="per_tensor"), weights=(1.0, 3.0))
    assert out[0, 0] == BASE[0, 0] - 2


def test_breadcrumbs_keeps_the_middle_ranks_per_row():
    # per row, n = 4: drop int(0.25 * 4) = 1 largest, keep the next int(0.5 * 4) = 2
    # [4,-1,0,2] -> [0,-1,0,2]; [-3,1,5,-2] -> [-3,0,0,-2]; [1,0,-6,3] -> [1,0,0,3]
    kept = TAU1 * breadcrumbs_mask(TAU1[None], 0.5, 0.25, "per_row")[0]
    assert torch.equal(kept, T([[0.0, -1, 0, 2], [-3, 0, 0, -2], [1, 0, 0, 3]]))
    params = BreadcrumbsParams(density=0.5, gamma=0.25, **{"lambda": 1.0})
    assert torch.equal(run("breadcrumbs_paper", params, models=(M1,), weights=(1.0,)), BASE + kept)
    # per tensor, n = 12: drop the top int(0.25 * 12) = 3 (-6, 5, 4), keep the next 6 (|x| 3, 3, 2, 2, 1, 1)
    flat = TAU1 * breadcrumbs_mask(TAU1[None], 0.5, 0.25, "per_tensor")[0]
    assert sorted(flat[flat != 0].abs().tolist()) == [1, 1, 2, 2, 3, 3]


def test_dare_drops_at_rate_p_and_rescales():
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(TAU1.shape, generator=torch.Generator().manual_seed(3)) >= 0.5
    assert torch.equal(dare_drop(TAU1, 0.5, g), TAU1 * keep / 0.5)
    assert torch.equal(dare_drop(TAU1, 0.5, torch.Generator().manual_seed(3), rescale=False), TAU1 * keep)
    assert torch.equal(dare_drop(TAU1, 0.0, g), TAU1)
    # unbiased: the mean over many draws approaches tau
    big = torch.full((200_000,), 2.0)
    out = dare_drop(big, 0.9, torch.Generator().manual_seed(0))
    assert abs((out == 0).float().mean().item() - 0.9) < 0.005
    assert abs(out.mean().item() - 2.0) < 0.05


def test_dare_paper_average_and_dare_ties():
    # drop 0 reduces DARE to its merge: the average of the task vectors
    assert torch.equal(run("dare_paper", DareParams(drop=0.0)), BASE + (TAU1 + TAU2) / 2)
    assert torch.equal(run("dare_ties_paper", DareTiesParams(drop=0.0, density=0.25, scope="per_tensor")),
                       run("ties_paper", TiesParams(density=0.25, scope="per_tensor")))
    a = run("dare_paper", DareParams(drop=0.5), seed=7)
    assert torch.equal(a, run("dare_paper", DareParams(drop=0.5), seed=7))  # deterministic with a seed
    assert not torch.equal(a, run("dare_paper", DareParams(drop=0.5), seed=8))


@pytest.mark.parametrize("name,params", [
    ("linear", LinearParams()), ("task_arithmetic", MergekitParams()), ("ties_paper", TiesParams(density=1.0, scope="per_tensor")),
    ("dare_paper", DareParams(drop=0.0)), ("dare_ties_paper", DareTiesParams(drop=0.0, density=1.0, scope="per_tensor")),
])
def test_merging_identical_models_returns_them(name, params):
    # weights summing to 1, so that task arithmetic's sum is one task vector too
    assert torch.equal(run(name, params, models=(M1, M1, M1), weights=(0.5, 0.25, 0.25)), M1)


def test_every_method_cites_its_paper_and_preserves_shape():
    models = [{"w": M1}, {"w": M2}, {"w": M1 - TAU2}]
    for name in MERGE_METHODS:
        m = MERGE_METHODS.get(name)
        assert "arXiv:" in m.fn.__doc__
        params = m.params.model_validate({"t": 0.5} if name in ("slerp", "nearswap") else {})
        n = m.n_models[1] or 2
        out = merge_dicts(name, params, {"w": BASE} if m.needs_base else None, models[:n])["w"]
        assert out.shape == BASE.shape and out.dtype == torch.float32
        if m.mergekit:  # mergekit's methods compute in, and return, the dtype they are given
            half = merge_dicts(name, params, {"w": BASE.bfloat16()} if m.needs_base else None,
                               [{"w": x["w"].bfloat16()} for x in models[:n]])["w"]
            # (mergekit's arcee_fusion and ramplus_tl return float32 from half-precision inputs)
            assert half.dtype == (torch.float32 if name in ("arcee_fusion", "ramplus_tl") else torch.bfloat16)


# -- mergekit's variants ----------------------------------------------------------------------

def mk(name, params=None, models=(M1, M2), weights=(1.0, 1.0), per_model=None, base=BASE, seed=0):
    ctx = Context(rng=torch.Generator().manual_seed(seed), per_model=per_model or [])
    return MERGE_METHODS.get(name).fn(base, list(models), list(weights), params or MergekitParams(), ctx)


def test_mergekit_ties_per_tensor_exact_k_weighted_divisor():
    # tau1 at density 5/12 keeps exactly its 5 largest (6, 5, 4, 3, 3); tau2 at 3/12 keeps 4, 3, 3:
    # tau1' = [[4,0,0,0],[-3,0,5,0],[0,0,-6,3]], 2 tau2' = [[0,-6,0,0],[6,0,0,0],[0,-8,0,0]]
    # sum [[4,-6,0,0],[3,0,5,0],[0,-8,-6,3]] -> majority (>= 0 -> +); at (1,0) only 2 tau2' = 6 agrees,
    # so 6 / w2 = 3; elsewhere each value over its own weight
    per = [MergekitModelParams(density=5 / 12), MergekitModelParams(density=0.25)]
    out = mk("ties", weights=(1.0, 2.0), per_model=per)
    assert torch.equal(out, BASE + T([[4.0, -3, 0, 0], [3, 0, 5, 0], [0, -4, -6, 3]]))
    raw = mk("ties", MergekitParams(normalize=False), weights=(1.0, 2.0), per_model=per)
    assert torch.equal(raw, BASE + T([[4.0, -6, 0, 0], [6, 0, 5, 0], [0, -8, -6, 3]]))
    # mergekit's default density 1.0 trims nothing: plain sign-consensus mean
    assert torch.equal(mk("ties", models=(M1, M1)), M1)


X = T([[0.1, -0.2, 0.3, -0.4], [0.5, -0.6, 0.7, -0.8], [0.9, -1.0, 1.1, -1.2]])


def test_mergekit_breadcrumbs_keeps_the_middle_of_the_whole_tensor():
    # n = 12, keep int(0.5 * 12) = 6 after dropping the top int(0.25 * 12) = 3: magnitudes 0.4 .. 0.9
    want = T([[0.0, 0, 0, -0.4], [0.5, -0.6, 0.7, -0.8], [0.9, 0, 0, 0]])
    kept = mergekit_sparsify(X, 0.5, "outliers", torch.Generator(), gamma=0.25)
    assert torch.equal(kept, want)
    # L1 rescale: ||X||_1 = 7.8, ||kept||_1 = 3.9 -> x 2
    assert torch.allclose(mergekit_sparsify(X, 0.5, "outliers", torch.Generator(), gamma=0.25, rescale=True),
                          2 * want)
    zero = torch.zeros(3, 4)
    out = mk("breadcrumbs", base=zero, models=(X,), weights=(1.0,), per_model=[MergekitModelParams(density=0.5,
                                                                                                   gamma=0.25)])
    assert torch.equal(out, want)


def test_mergekit_dare_keeps_the_l1_norm_and_density():
    delta = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
    out = mergekit_sparsify(delta, 0.3, "random", torch.Generator().manual_seed(2), rescale=True)
    assert abs((out != 0).float().mean().item() - 0.3) < 0.01
    assert torch.allclose(out.abs().sum(), delta.abs().sum(), rtol=1e-5)
    # dare_ties sums agreeing entries (no mean): density 1 leaves tau1 + tau2 where the signs agree
    out = mk("dare_ties")
    s = TAU1 + TAU2
    agree1 = TAU1.sign() == torch.where(s >= 0, 1.0, -1.0)
    agree2 = TAU2.sign() == torch.where(s >= 0, 1.0, -1.0)
    assert torch.equal(out, BASE + TAU1 * agree1 + TAU2 * agree2)


def test_mergekit_magnitude_keeps_at_least_one_entry():
    assert (mergekit_sparsify(X, 0.01, "magnitude", torch.Generator()) != 0).sum() == 1
    assert torch.equal(mergekit_sparsify(X, 1.0, "magnitude", torch.Generator()), X)


def test_mergekit_selection_is_the_mask_torchs_sort_gives_ties_included():
    """mergekit keeps argsort(|d|, descending)[:k] (magnitude) and sort(|d|).indices[a:b] (outliers); torch's
    sort is not stable, so among equal magnitudes at a cut the survivors are the sort's. Both selections
    must give those masks: by thresholds when no tie straddles a cut, by the sort when one does."""
    from mixtune.merge.compat import rank_range, top_k_mask

    v = T([3.0, 1, 2, 2, 2, 5, 0])
    assert top_k_mask(v, 2).tolist() == [True, False, False, False, False, True, False]  # no tie at the cut
    g = torch.Generator().manual_seed(0)
    for n in (1000, 70_000):
        half = torch.randn(n, generator=g).to(torch.bfloat16).abs()  # bf16: thousands of equal magnitudes
        distinct = torch.randperm(n, generator=g).float()
        runs = (torch.arange(n) // 10).to(torch.float16)[torch.randperm(n, generator=g)]  # runs of 10 equal values
        # half-precision magnitudes are counted by value, float32 ones selected; mergekit sorts their float32 copy
        for x in (half, half.float(), half.to(torch.float16), distinct, runs):
            for k in (1, n // 10, n // 2, n - 1, 30, 35):
                want = torch.zeros(n, dtype=torch.bool)
                want[torch.argsort(x.float(), descending=True)[:k]] = True
                assert torch.equal(top_k_mask(x, k), want), (x.dtype, n, k)
            for a, b in ((0, n // 3), (n // 4, n - n // 5), (n - 7, n), (5, 5), (20, 40), (25, 45)):
                want = torch.zeros(n, dtype=torch.bool)
                want[torch.sort(x.float()).indices[a:b]] = True
                assert torch.equal(rank_range(x, a, b), want), (x.dtype, n, a, b)


def test_kth_smallest_is_exact_on_large_tensors_with_ties():
    from mixtune.merge.methods import kth_smallest

    v = torch.randn(5_000_000, generator=torch.Generator().manual_seed(1)).round(decimals=2)
    ordered = v.sort().values
    for k in (1, 2, 1000, 2_500_000, 4_999_999, 5_000_000):
        assert kth_smallest(v, k) == ordered[k - 1]


def test_kth_of_values_computed_chunk_by_chunk_is_exact():
    """The values |a - b| of two tensors, never held whole: read 300,000 at a time."""
    from mixtune.merge.methods import kth_of

    g = torch.Generator().manual_seed(2)
    a = torch.randn(3_000_000, generator=g).round(decimals=2)
    b = torch.randn(3_000_000, generator=g).round(decimals=2)
    ordered = (a - b).abs().sort().values
    for k in (2, 1000, 1_500_000, 2_999_999):
        assert kth_of(a.numel(), k, lambda at: (a[at] - b[at]).abs(), chunk=300_000) == ordered[k - 1]


# -- whole-model scope and the methods that default to it ---------------------------------------

import math

from mixtune.merge.methods import CompeftParams, LinesParams, PcbParams, TransferParams

ZERO2 = {"a": torch.zeros(4), "b": torch.zeros(4)}
TWO = {"a": T([4.0, -1, 0, 2]), "b": T([-3.0, 1, 5, -2])}  # one model, two tensors: |x| 0,1,1,2,2,3,4,5


def test_ties_global_trims_over_the_whole_model():
    # n = 8, k = int(0.25 * 8) = 2: threshold = 6th smallest |x| = 3, so 4, -3, 5 stay (a's 2 goes);
    # per tensor (n = 4, k = 1) each tensor keeps its own top: a keeps 4 and 2 (threshold 2)
    out = merge_dicts("ties_paper", TiesParams(density=0.25), ZERO2, [TWO])
    assert torch.equal(out["a"], T([4.0, 0, 0, 0])) and torch.equal(out["b"], T([-3.0, 0, 5, 0]))
    per = merge_dicts("ties_paper", TiesParams(density=0.25, scope="per_tensor"), ZERO2, [TWO])
    assert torch.equal(per["a"], T([4.0, 0, 0, 2]))


def test_ties_global_breaks_zero_sums_with_the_whole_models_majority():
    # no trim; a[0] sums to 0. gamma: a -> [0, +1], b -> [-1, -1, -1]; the model's majority is
    # sign(1 - 3) = -1, so a[0] takes -1 and only model 2's -1 agrees; a tensor's own majority (+1) takes model 1's 1
    base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    m1 = {"a": T([1.0, 2]), "b": T([-3.0, -3, -3])}
    m2 = {"a": T([-1.0, 2]), "b": T([-3.0, -3, -3])}
    assert merge_dicts("ties_paper", TiesParams(density=1.0), base, [m1, m2])["a"][0] == -1
    assert merge_dicts("ties_paper", TiesParams(density=1.0, scope="per_tensor"), base, [m1, m2])["a"][0] == 1


def test_breadcrumbs_global_cuts_by_whole_model_ranks():
    # n = 8: drop the top int(0.125 * 8) = 1 (5), keep the next int(0.5 * 8) = 4: ranks 4..7 = |x| 2, 2, 3, 4
    out = merge_dicts("breadcrumbs_paper", BreadcrumbsParams(density=0.5, gamma=0.125, scope="global",
                                                             **{"lambda": 1.0}), ZERO2, [TWO])
    assert torch.equal(out["a"], T([4.0, 0, 0, 2])) and torch.equal(out["b"], T([-3.0, 0, 0, -2]))


def test_global_statistics_are_exact_when_sampled(monkeypatch):
    from mixtune.merge import context

    monkeypatch.setattr(context, "SAMPLE", 4096)  # far fewer samples than entries: bracket, gather, select
    g = torch.Generator().manual_seed(0)
    model = {f"t{i}": torch.randn(n, generator=g).round(decimals=2) for i, n in enumerate((50_000, 30_000, 7))}
    base = {k: torch.zeros_like(v) for k, v in model.items()}
    out = merge_dicts("ties_paper", TiesParams(density=0.1), base, [model])
    flat = torch.cat(list(model.values())).abs()
    threshold = flat.sort().values[flat.numel() - int(0.1 * flat.numel()) - 1]
    for k, v in model.items():
        assert torch.equal(out[k], v * (v.abs() >= threshold))


def test_pcb_by_hand():
    # T1 = [2,-1,0,1], T2 = [1,1,0,-2], n = 2 models, clip 0 (a_lo = min = 0, a_hi = max = 2):
    # intra1 = exp(2 [1, .25, 0, .25]) = [e^2, e^.5, 1, e^.5]; intra2 = [e^.5, e^.5, 1, e^2]
    # sum T = [3, 0, 0, -1]: inter1 = tanh([6, 0, 0, -1]); inter2 = tanh([3, 0, 0, 2])
    # score1 = [e^2 tanh 6, 0, 0, -e^.5 tanh 1]; score2 = [e^.5 tanh 3, 0, 0, e^2 tanh 2]
    t1, t2 = T([2.0, -1, 0, 1]), T([1.0, 1, 0, -2])
    zero = {"w": torch.zeros(4)}
    e = math.exp
    s1 = [e(2) * math.tanh(6), 0, 0, -e(0.5) * math.tanh(1)]
    s2 = [e(0.5) * math.tanh(3), 0, 0, e(2) * math.tanh(2)]
    # r = 1: s_lo = the minimum, so scale = minmax(score) = (s - min) / (max - min)
    sc1 = [(v - min(s1)) / (max(s1) - min(s1)) for v in s1]  # [1, c, c, 0]
    sc2 = [(v - min(s2)) / (max(s2) - min(s2)) for v in s2]  # [q, 0, 0, 1]
    want = [(2 * sc1[0] + 1 * sc2[0]) / (sc1[0] + sc2[0]), -1 * sc1[1] / sc1[1], 0.0, -2.0]
    out = merge_dicts("pcb", PcbParams(ratio=1.0, clip=0.0), zero, [{"w": t1}, {"w": t2}])["w"]
    assert torch.allclose(out, T(want), atol=1e-6)
    # r = 0.5: s_lo is the int(4 * 0.5) + 1 = 3rd smallest score (0 for model 1, e^.5 tanh 3 for model 2), so
    # only each model's top entry keeps a weight: scale1 = [1,0,0,0], scale2 = [0,0,0,1] -> [2, 0, 0, -2]
    out = merge_dicts("pcb", PcbParams(ratio=0.5, clip=0.0), zero, [{"w": t1}, {"w": t2}])["w"]
    assert torch.allclose(out, T([2.0, 0, 0, -2]), atol=1e-6)


def test_pcb_clips_magnitudes_to_their_quantiles():
    # n = 10, clip 0.1: a_lo = the int(1) + 1 = 2nd smallest |T|, a_hi = the int(9) = 9th; one model
    # (inter = tanh(T^2) > 0), r = 1: the clipped vector's entries are sign(T) * clamp(|T|, 1, 8)
    t = T([0.0, 1, 2, 3, 4, 5, 6, 7, 8, -100])
    out = merge_dicts("pcb", PcbParams(ratio=1.0, clip=0.1), {"w": torch.zeros(10)}, [{"w": t}])["w"]
    want = T([1.0, 1, 2, 3, 4, 5, 6, 7, 8, -8])
    kept = out != 0  # entries whose balanced score is the minimum get scale 0 (0/0 -> 0 here)
    assert torch.allclose(out[kept], want[kept]) and kept.sum() >= 8


def test_lines_scales_by_block_depth_from_the_name():
    keys = ["model.embed_tokens.weight", "model.layers.0.q.weight", "model.layers.1.q.weight",
            "model.layers.2.mlp.experts.3.w", "lm_head.weight"]
    base = {k: torch.zeros(2) for k in keys}
    ones = {k: torch.ones(2) for k in keys}
    # L = 3 blocks, alpha 0.1, beta = 1 - alpha: s(l) = 0.1 + 0.9 l / 2; outside the blocks 0.1
    out = merge_dicts("lines", LinesParams(alpha=0.1), base, [ones])
    assert [round(out[k][0].item(), 6) for k in keys] == [0.1, 0.1, 0.55, 1.0, 0.1]
    # multi-task: alpha auto = 1/T with T = 2, beta 0.3: block 1 -> 0.5 + 0.3 * 0.5 = 0.65, times the sum (2)
    out = merge_dicts("lines", LinesParams(alpha="auto", beta=0.3), base, [ones, ones])
    assert round(out["model.layers.1.q.weight"][0].item(), 6) == 1.3 and out["lm_head.weight"][0] == 1.0


def test_compeft_is_ternary_with_the_dense_std():
    # tau = [4,-1,0,2,-3,1,5,-2]: mean 0.75, sum of squares 60, unbiased var (60 - 8 * 0.5625) / 7 = 55.5 / 7;
    # density 0.25 keeps |x| >= 3 (threshold as in TIES): 4, -3, 5 -> sigma * [1,0,0,0 | -1,0,1,0]
    sigma = math.sqrt(55.5 / 7)
    out = merge_dicts("compeft", CompeftParams(density=0.25), ZERO2, [TWO])
    assert torch.allclose(out["a"], sigma * T([1.0, 0, 0, 0])) and torch.allclose(out["b"], sigma * T([-1.0, 0, 1, 0]))
    assert len(set(torch.cat([out["a"], out["b"]]).tolist())) == 3  # {-s, 0, s}
    pruned = merge_dicts("compeft", CompeftParams(density=0.25, alpha=None), ZERO2, [TWO])
    assert torch.equal(pruned["b"], T([-3.0, 0, 5, 0]))
    # per tensor: each tensor's own std (a: [4,-1,0,2] -> var (21 - 4 * 1.5625) / 3) and top-k
    per = merge_dicts("compeft", CompeftParams(density=0.25, scope="per_tensor"), ZERO2, [TWO])
    assert torch.allclose(per["a"], math.sqrt((21 - 6.25) / 3) * T([1.0, 0, 0, 1]))


def test_transfer_adds_the_source_diff_to_the_target():
    src, ft, tgt = {"w": T([1.0, 2])}, {"w": T([1.5, 1])}, {"w": T([10.0, 20])}
    assert torch.equal(merge_dicts("transfer", TransferParams(), src, [ft, tgt])["w"], T([10.5, 19]))
    # onto its own base, the transfer is the fine-tune itself
    assert torch.equal(merge_dicts("transfer", TransferParams(), src, [ft, src])["w"], ft["w"])
    with pytest.raises(Exception, match="two models"):
        merge_dicts("transfer", TransferParams(), src, [ft])


@pytest.mark.parametrize("name,params", [
    ("ties_paper", TiesParams()), ("dare_ties_paper", DareTiesParams(drop=0.3)), ("pcb", PcbParams()),
    ("compeft", CompeftParams()), ("breadcrumbs_paper", BreadcrumbsParams(scope="global")),
])
def test_global_methods_are_deterministic_and_keep_identical_models(name, params):
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g)}
    ft = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    ft2 = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    one = merge_dicts(name, params, base, [ft, ft2], seed=3)
    assert all(torch.equal(one[k], v) for k, v in merge_dicts(name, params, base, [ft, ft2], seed=3).items())
    same = merge_dicts(name, params, base, [base, base])
    assert all(torch.equal(same[k], base[k]) for k in base)
