import math

import pytest
import torch

from mixtune.core import ConfigError
from mixtune.train.losses import token_losses
from mixtune.train.preference import dpo_loss, ipo_loss, sequence_logps, simpo_loss

t = torch.tensor


def test_sequence_logps_shift_mask_sum_and_mean():
    # vocabulary of 2. Row 0: position 0 predicts labels[1] = 1 from logits (0, ln 3): ln 3/4;
    # position 1 predicts labels[2] = 0 from (0, 0): ln 1/2; position 2 predicts an ignored label.
    # labels[:, 0] = 5 is outside the vocabulary: never scored, so it must not be looked up.
    # Row 1 has no scored token: sum 0 and mean 0 (not 0/0).
    logits = t([[[0.0, math.log(3)], [0.0, 0.0], [9.0, -9.0], [1.0, 2.0]],
                [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]])
    labels = t([[5, 1, 0, -100], [-100, -100, -100, -100]])
    total = sequence_logps(logits, labels)
    mean = sequence_logps(logits, labels, average=True)
    assert total.shape == (2,)
    assert torch.allclose(total, t([math.log(3 / 8), 0.0]))
    assert torch.allclose(mean, t([math.log(3 / 8) / 2, 0.0]))
    # the same numbers as the SFT token losses, negated and summed
    assert torch.allclose(total, -token_losses(logits, labels).sum(-1))


def test_sequence_logps_custom_ignore_index_and_half_precision():
    logits = t([[[0.0, math.log(3)], [0.0, 0.0], [0.0, 0.0]]])
    labels = t([[0, 1, -1]])
    out = sequence_logps(logits.bfloat16(), labels, ignore_index=-1)
    assert out.dtype == torch.float32
    assert torch.allclose(out, t([math.log(3 / 4)]), atol=1e-2)


def test_dpo_by_hand():
    # pair 0: chosen log-ratio -1 - (-2) = 1, rejected -3 - (-2) = -1, h = 2:
    #   loss = -log sigmoid(0.1 * 2) = log(1 + e^-0.2) = 0.598139; rewards 0.1, -0.1
    # pair 1: both log-ratios 0.5, h = 0: loss = log 2; rewards 0.05, 0.05
    pc, pr = t([-1.0, -4.5]), t([-3.0, -6.5])
    rc, rr = t([-2.0, -5.0]), t([-2.0, -7.0])
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert torch.allclose(losses, t([0.598139, math.log(2)]), atol=1e-6)
    assert torch.allclose(cr, t([0.1, 0.05])) and torch.allclose(rj, t([-0.1, 0.05]))


def test_dpo_label_smoothing_by_hand():
    # -log sigmoid(-z) = -log sigmoid(z) + z, so with eps = 0.1 and z = beta h = 0.2:
    # 0.9 * 0.598139 + 0.1 * (0.598139 + 0.2) = 0.598139 + 0.02 = 0.618139
    losses, _, _ = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.1, label_smoothing=0.1)
    assert torch.allclose(losses, t([0.618139]), atol=1e-6)


def test_dpo_gradient_and_detached_rewards():
    # d loss / d policy_chosen = -beta (1 - sigmoid(beta h)) = -0.1 * (1 - sigmoid(0.2)) = -0.0450166,
    # and the opposite for policy_rejected
    pc = t([-1.0], requires_grad=True)
    pr = t([-3.0], requires_grad=True)
    losses, cr, rj = dpo_loss(pc, pr, t([-2.0]), t([-2.0]))
    losses.mean().backward()
    assert torch.allclose(pc.grad, t([-0.0450166]), atol=1e-6)
    assert torch.allclose(pr.grad, t([0.0450166]), atol=1e-6)
    assert not cr.requires_grad and not rj.requires_grad


def test_ipo_by_hand():
    # beta = 0.1: target margin 1 / (2 * 0.1) = 5. Inputs are mean token log-probs.
    # pair 0: h = (-1 + 2) - (-3 + 2) = 2, loss (2 - 5)^2 = 9; pair 1: h = (0 - (-5)) - 0 = 5, loss 0.
    # d loss / d policy_chosen for pair 0 = 2 (h - 5) / 2 pairs = -3
    pc = t([-1.0, 0.0], requires_grad=True)
    losses, cr, rj = ipo_loss(pc, t([-3.0, -1.0]), t([-2.0, -5.0]), t([-2.0, -1.0]), beta=0.1)
    assert torch.allclose(losses, t([9.0, 0.0]), atol=1e-5)
    assert torch.allclose(cr, t([0.1, 0.5])) and torch.allclose(rj, t([-0.1, 0.0]))
    losses.mean().backward()
    assert torch.allclose(pc.grad, t([-3.0, 0.0]), atol=1e-5)


def test_simpo_by_hand():
    # beta = 2, gamma / beta = 0.5 (gamma = 1). pair 0: mean log-probs -0.5 vs -1.5, difference 1:
    #   loss = -log sigmoid(2 * 1 - 1) = log(1 + e^-1) = 0.313262; rewards 2 * -0.5 = -1, 2 * -1.5 = -3
    # pair 1: difference 0.5 exactly the margin: loss log 2
    losses, cr, rj = simpo_loss(t([-0.5, -1.0]), t([-1.5, -1.5]))
    assert torch.allclose(losses, t([0.313262, math.log(2)]), atol=1e-6)
    assert torch.allclose(cr, t([-1.0, -2.0])) and torch.allclose(rj, t([-3.0, -3.0]))
    # label smoothing eps = 0.1 at z = 1: 0.313262 + 0.1 * 1
    smoothed, _, _ = simpo_loss(t([-0.5]), t([-1.5]), label_smoothing=0.1)
    assert torch.allclose(smoothed, t([0.413262]), atol=1e-6)


def test_simpo_gradient_flows():
    c = t([-0.5], requires_grad=True)
    losses, _, _ = simpo_loss(c, t([-1.5]))
    losses.sum().backward()
    # d/dc -log sigmoid(z) with z = 2 (c - r) - 1 = 1: -2 (1 - sigmoid(1)) = -0.537883
    assert torch.allclose(c.grad, t([-0.537883]), atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"beta": 0.0}, {"beta": -1.0}, {"label_smoothing": 0.5}])
def test_bad_parameters_raise(kwargs):
    x = t([-1.0])
    with pytest.raises(ConfigError):
        dpo_loss(x, x, x, x, **kwargs)
