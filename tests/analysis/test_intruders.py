"""Intruder dimensions (Shuttleworth et al., 2024) on hand-built matrices, and parity with peft's mitigation."""

import math

import pytest
import torch

from mixtune.analysis import intruder_dimensions, mitigate_intruders

# a 4 x 2 matrix (HF [out, in]) whose left singular vectors are e1, e2; fine-tuning adds 6 e4 e1^T, so
# the top singular vector of W is (3, 0, 0, 6) / sqrt(45): |cos| with e1 is 3 / sqrt(45) = 0.447, with e2 0
W0 = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
W = W0 + 6.0 * torch.outer(torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.tensor([1.0, 0.0]))


def test_a_planted_intruder_is_found_at_the_right_eps():
    got = intruder_dimensions(W0, W, k=2)
    assert got.singular_values.tolist() == pytest.approx([math.sqrt(45), 2.0])
    assert got.max_cosine.tolist() == pytest.approx([3 / math.sqrt(45), 1.0])
    assert got.indices == [0] and got.count() == 1  # eps 0.5, the default
    assert got.count(0.4) == 0 and got.count(0.45) == 1 and got.count(1.01) == 2
    assert intruder_dimensions(W0, W, k=1, eps=0.4).indices == []


def test_small_full_rank_noise_makes_no_intruders_and_a_large_orthogonal_rank_one_update_does():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(16, 8, generator=g)
    assert intruder_dimensions(w0, w0 + 1e-3 * torch.randn(16, 8, generator=g)).count() == 0
    _, _, vh = torch.linalg.svd(w0, full_matrices=False)
    u0, _, _ = torch.linalg.svd(w0, full_matrices=True)
    outside = u0[:, 8]  # orthogonal to every left singular vector of w0 (its column space is 8-D)
    assert intruder_dimensions(w0, w0 + 50 * torch.outer(outside, vh[0])).indices == [0]


def test_mitigation_scales_the_intruders_singular_values_by_lambda():
    # sigma_1 u_1 v_1^T is W's first column times e1^T (the columns are orthogonal), so lam = 0.75 leaves
    # 0.75 of it: column 1 becomes (2.25, 0, 0, 4.5); nothing else changes
    out = mitigate_intruders(W0, W, k=2, lam=0.75)
    assert torch.allclose(out, torch.tensor([[2.25, 0.0], [0.0, 2.0], [0.0, 0.0], [4.5, 0.0]]), atol=1e-5)
    assert torch.equal(mitigate_intruders(W0, W0 + 1e-4), W0 + 1e-4)  # no intruders: unchanged
    with pytest.raises(ValueError, match="two 2-D matrices of one shape"):
        intruder_dimensions(W0, W.T)


def test_detection_and_mitigation_match_peft_reduce_intruder_dimension():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(2, 4, bias=False)

        def forward(self, x):
            return self.proj(x)

    net = Net()
    net.proj.weight.data = W0.clone()
    model = get_peft_model(net, LoraConfig(r=1, lora_alpha=1, target_modules=["proj"], init_lora_weights=False))
    layer = model.base_model.model.proj
    layer.lora_B["default"].weight.data = torch.tensor([[0.0], [0.0], [0.0], [6.0]])
    layer.lora_A["default"].weight.data = torch.tensor([[1.0, 0.0]])
    merged = W0 + layer.get_delta_weight("default")
    assert torch.allclose(merged, W)
    said: list[str] = []
    reduce_intruder_dimension(model, top_k=10, threshold_epsilon=0.5, mitigation_lambda=0.75, logging_sink=said.append)
    assert any(f"Intruders: {intruder_dimensions(W0, merged).count()}" in m for m in said)
    peft_delta = layer.get_delta_weight("intruder_reduced")  # rank 1 here, so peft's re-factorisation is exact
    assert torch.allclose(peft_delta, mitigate_intruders(W0, merged) - W0, atol=1e-5)
