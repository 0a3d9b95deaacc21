"""Task-vector geometry on vectors whose cosines, sign conflicts and overlaps are worked out by hand."""

import pytest
import torch

from mixtune.analysis import cosine, layer_norms, sign_conflicts, topk_jaccard


def test_cosine_over_the_whole_model():
    a = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([0.0, 1.0])}
    b = {"x": torch.tensor([1.0, 1.0]), "y": torch.tensor([0.0, 0.0])}
    assert cosine(a, b) == pytest.approx(0.5)  # (1,0,0,1).(1,1,0,0) = 1 over sqrt(2) sqrt(2)
    assert cosine(a, a) == pytest.approx(1.0) and cosine(a, {k: -v for k, v in a.items()}) == pytest.approx(-1.0)
    assert cosine(a, {k: torch.zeros(2) for k in a}) == 0.0
    with pytest.raises(ValueError, match="different parameters"):
        cosine(a, {"x": torch.zeros(2)})


def test_sign_conflicts_count_disagreeing_signs_where_two_trimmed_vectors_are_nonzero():
    t1, t2 = torch.tensor([1.0, -2.0, 3.0, 0.1]), torch.tensor([-1.0, 2.0, 3.0, 0.1])
    assert sign_conflicts([t1, t2], density=1.0) == pytest.approx(0.5)  # entries 0 and 1 of 4
    # density 0.5 of 4 entries: at or above the 2nd smallest magnitude (1.0), entries 0-2 stay; 2 of 3 conflict
    assert sign_conflicts([t1, t2], density=0.5) == pytest.approx(2 / 3)
    assert sign_conflicts([t1, torch.zeros(4)], density=1.0) == 0.0  # nothing shared


def test_topk_mask_overlap():
    a, b = torch.tensor([5.0, 4.0, 0.1, 0.2]), torch.tensor([0.1, 4.0, 5.0, 0.2])
    # density 0.25: at or above the 3rd smallest magnitude (4.0): a keeps {0, 1}, b keeps {1, 2}
    assert topk_jaccard(a, b, density=0.25) == pytest.approx(1 / 3)
    assert topk_jaccard(a, a, density=0.25) == 1.0


def test_norms_per_block_and_outside_the_blocks():
    tau = {"model.layers.0.mlp.up_proj.weight": torch.tensor([3.0, 4.0]), "model.layers.1.self_attn.q.weight":
           torch.tensor([1.0]), "model.embed_tokens.weight": torch.tensor([2.0]), "lm_head.weight": torch.tensor([0.0])}
    assert layer_norms(tau) == {"0": 5.0, "1": 1.0, "other": 2.0}
