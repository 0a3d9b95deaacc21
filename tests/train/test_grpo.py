import math

import pytest
import torch

from mixtune.core import ConfigError
from mixtune.train.grpo import clipped_surrogate, group_advantages, grpo_loss, kl_k3

t = torch.tensor
KL_LN2 = 2 - math.log(2) - 1  # k3 at log ref - log pi = ln 2: 0.306853


def test_group_advantages_by_hand():
    # group 1: [1, 0, 0, 1], mean 0.5; unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3) = 0.577350
    #   -> +-0.5 / (0.577350 + 1e-4) = +-0.865876 (the biased std 0.5 would give +-0.9998)
    # group 2: [1, 1, 1, 1], all equal: 0 / (0 + 1e-4) = 0
    adv = group_advantages(t([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), 4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert abs(a - 0.865876) < 1e-6
    assert torch.allclose(adv, t([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]), atol=1e-6)


def test_group_advantages_without_scaling_and_with_one_sample():
    r = t([1, 0, 0, 1, 1, 1, 1, 1])  # integer rewards are fine
    assert torch.allclose(group_advantages(r, 4, scale=False), t([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    assert torch.equal(group_advantages(t([3.0, 7.0]), 1), t([0.0, 0.0]))


def test_group_advantages_skip_unscorable():
    # [1, nan, 0, 1]: the three scored rewards have mean 2/3 and unbiased variance
    # ((1/3)^2 * 2 + (2/3)^2) / 2 = 1/3; the NaN one gets 0
    adv = group_advantages(t([1.0, float("nan"), 0.0, 1.0]), 4)
    s = math.sqrt(1 / 3) + 1e-4
    assert torch.allclose(adv, t([(1 / 3) / s, 0.0, -(2 / 3) / s, (1 / 3) / s]), atol=1e-6)


def test_group_advantages_reject_ragged_groups():
    with pytest.raises(ConfigError):
        group_advantages(t([1.0, 0.0, 1.0]), 2)


def test_clipped_surrogate_by_hand():
    # ratios 1.5 (above 1 + 0.2), 0.5 (below 1 - 0.2), 1.0; A = +2 on row 0, -2 on row 1:
    # rho 1.5: A > 0 -> min(3, 2.4) = 1.2 A = 2.4;   A < 0 -> min(-3, -2.4) = 1.5 A = -3
    # rho 0.5: A > 0 -> min(1, 1.6) = 0.5 A = 1;     A < 0 -> min(-1, -1.6) = 0.8 A = -1.6
    # rho 1.0: A either way. The 4th token is padding: 0 whatever its ratio.
    logp = t([[math.log(1.5), math.log(0.5), 0.0, 30.0]] * 2)
    old = torch.zeros(2, 4)
    mask = t([[1, 1, 1, 0]] * 2)
    obj = clipped_surrogate(logp, old, t([2.0, -2.0]), mask)
    assert torch.allclose(obj, t([[2.4, 1.0, 2.0, 0.0], [-3.0, -1.6, -2.0, 0.0]]), atol=1e-6)
    # DAPO clip-higher: the upper bound moves to 1.28
    high = clipped_surrogate(logp, old, t([2.0, -2.0]), mask, epsilon_high=0.28)
    assert torch.allclose(high[0, 0], t(2.56)) and torch.allclose(high[1, 1], t(-1.6))


def test_clipped_tokens_get_no_gradient():
    # d obj / d logp = rho A unclipped, 0 where the clipped branch is the minimum
    logp = t([[math.log(1.5), 0.0]], requires_grad=True)
    obj = clipped_surrogate(logp, torch.zeros(1, 2), t([2.0]), t([[True, True]]))
    obj.sum().backward()
    assert torch.allclose(logp.grad, t([[0.0, 2.0]]))


def test_kl_k3_by_hand():
    logp = t([-1.0, 0.0, math.log(2)])
    ref = t([-1.0, math.log(2), 0.0])
    # equal: 0; d = ln 2: 2 - ln 2 - 1 = 0.306853; d = -ln 2: 0.5 + ln 2 - 1 = 0.193147
    assert torch.allclose(kl_k3(logp, ref), t([0.0, 0.306853, 0.193147]), atol=1e-6)


def batch():
    # two completions, 3 positions; row 0 trains 2 tokens, row 1 one token. Trained tokens have
    # logp = old = 0 (ratio 1) and ref = ln 2 (k3 = 0.306853); padding carries junk that the
    # mask must drop (a ratio of e^5 and a far reference).
    logp = t([[0.0, 0.0, 5.0], [0.0, 5.0, 5.0]])
    old = torch.zeros(2, 3)
    ref = t([[math.log(2), math.log(2), -20.0], [math.log(2), -20.0, -20.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    return logp, old, ref, t([1.0, -1.0]), mask


def test_grpo_loss_aggregations_by_hand():
    logp, old, ref, adv, mask = batch()
    # per trained token l = -A + 0.04 * 0.306853: row 0 -1 + k, row 1 +1 + k, k = 0.0122741
    k = 0.04 * KL_LN2
    # sequence (TRL "grpo"): mean of the rows' token means = ((-1 + k) + (1 + k)) / 2 = k
    assert torch.allclose(grpo_loss(logp, old, ref, adv, mask), t(k), atol=1e-6)
    # token (TRL "bnpo"): (2 (-1 + k) + (1 + k)) / 3 trained tokens = -1/3 + k
    assert torch.allclose(grpo_loss(logp, old, ref, adv, mask, aggregation="token"), t(-1 / 3 + k), atol=1e-6)
    # token with a given normaliser (TRL "dapo"): (-1 + 3k) / 6
    dapo = grpo_loss(logp, old, ref, adv, mask, aggregation="token", num_tokens=6)
    assert torch.allclose(dapo, t((-1 + 3 * k) / 6), atol=1e-6)
    # constant (TRL "dr_grpo"): (-1 + 3k) / (2 rows * max length 4)
    drg = grpo_loss(logp, old, ref, adv, mask, aggregation="constant", max_length=4)
    assert torch.allclose(drg, t((-1 + 3 * k) / 8), atol=1e-6)
    # beta = 0 needs no reference
    assert torch.allclose(grpo_loss(logp, old, None, adv, mask, beta=0.0), t(0.0), atol=1e-6)


def test_grpo_loss_gradient_on_policy():
    # old = logp.detach(): ratio 1 but d rho / d logp = 1, and d k3 / d logp = 1 - exp(d) = 0 when
    # ref = logp. "sequence": d loss / d logp_{i,t} = -A_i / |o_i| / B:
    # row 0: -1 / 2 / 2 = -0.25 on each trained token; row 1: +1 / 1 / 2 = 0.5; padding 0
    _, _, _, adv, mask = batch()
    logp = t([[-0.5, -1.0, -2.0], [-0.3, -4.0, -1.0]], requires_grad=True)
    loss = grpo_loss(logp, logp.detach(), logp.detach().clone(), adv, mask)
    loss.backward()
    assert torch.allclose(logp.grad, t([[-0.25, -0.25, 0.0], [0.5, 0.0, 0.0]]), atol=1e-6)


def test_grpo_loss_bad_arguments_raise():
    logp, old, ref, adv, mask = batch()
    with pytest.raises(ConfigError):
        grpo_loss(logp, old, None, adv, mask)  # beta 0.04 without a reference
    with pytest.raises(ConfigError):
        grpo_loss(logp, old, ref, adv, mask, aggregation="constant")
    with pytest.raises(ConfigError):
        grpo_loss(logp, old, ref, adv, mask, aggregation="dapo")
