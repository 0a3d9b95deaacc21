import math

import torch

from mixtune.train.losses import per_source, token_losses


def test_token_losses_by_hand():
    # One row of 3 tokens over a vocabulary of 2. Position 0 predicts labels[1] = 1, position 1
    # predicts labels[2], which is ignored. Logits at position 0 are (0, ln 3): p(1) = 3/4.
    logits = torch.tensor([[[0.0, math.log(3)], [5.0, 1.0], [0.0, 0.0]]])
    labels = torch.tensor([[7, 1, -100]])
    ce = token_losses(logits, labels)
    assert ce.shape == (1, 2)
    assert torch.allclose(ce, torch.tensor([[-math.log(3 / 4), 0.0]]))


def test_per_source_sums_use_the_source_of_the_predicted_token():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # (B=2, L-1=3)
    labels = torch.tensor([[0, 5, 5, -100], [0, -100, 5, 5]])
    sources = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]])
    sums, counts = per_source(values, labels, sources, 2)
    # trained predicted positions: row0 t=1 (src 0, 1.0), t=2 (src 1, 2.0); row1 t=2 (src 0, 5.0), t=3 (src 0, 6.0)
    assert sums.tolist() == [12.0, 2.0] and counts.tolist() == [3.0, 1.0]


def test_mftcoder_cases_weight_tokens_by_hand():
    from mixtune.train.losses import token_weights

    # two rows of 5 tokens, 4 predicted positions each; trained positions (labels[:, 1:] != -100):
    # row 0: example 0 (task 0) at t=0,1 and example 1 (task 0) at t=2; row 1: example 2 (task 1) at t=0
    labels = torch.tensor([[0, 5, 5, 5, -100], [0, 5, -100, -100, -100]])
    sources = torch.tensor([[0, 0, 0, 0, -1], [1, 1, -1, -1, -1]])
    examples = torch.tensor([[0, 0, 0, 1, -1], [2, 2, -1, -1, -1]])
    w = {m: token_weights(labels, sources, examples, m) for m in ("case1", "case2", "case3", "case4")}
    t = torch.tensor
    # case1: 4 trained tokens, 1/4 each
    assert torch.allclose(w["case1"], t([[0.25, 0.25, 0.25, 0], [0.25, 0, 0, 0]], dtype=torch.float64))
    # case2: 3 examples: e0's 2 tokens 1/2 * 1/3 each, e1 1/3, e2 1/3
    assert torch.allclose(w["case2"], t([[1 / 6, 1 / 6, 1 / 3, 0], [1 / 3, 0, 0, 0]], dtype=torch.float64))
    # case3: task 0 has 3 tokens (1/3 each of its mean), task 1 one; the two tasks averaged
    assert torch.allclose(w["case3"], t([[1 / 6, 1 / 6, 1 / 6, 0], [1 / 2, 0, 0, 0]], dtype=torch.float64))
    # case4: task 0 = mean of e0 (tokens 1/2 each) and e1 (1): e0 tokens 1/4, e1 1/2; halved over 2 tasks
    assert torch.allclose(w["case4"], t([[1 / 8, 1 / 8, 1 / 4, 0], [1 / 2, 0, 0, 0]], dtype=torch.float64))
    # case3 with task weights 1 and 3: task 0 gets 1/4 of the loss, task 1 3/4
    tw = token_weights(labels, sources, examples, "case3", task_weights=t([1.0, 3.0]))
    assert torch.allclose(tw, t([[1 / 12, 1 / 12, 1 / 12, 0], [3 / 4, 0, 0, 0]], dtype=torch.float64))
    # C-RLFT: rewards 1 (task 0) and 0.1 (task 1) in the token mean: sum r l / sum r, sum r = 3.1
    cr = token_weights(labels, sources, examples, "case1", rewards=t([1.0, 0.1]))
    assert torch.allclose(cr, t([[1 / 3.1, 1 / 3.1, 1 / 3.1, 0], [0.1 / 3.1, 0, 0, 0]], dtype=torch.float64))
    for v in w.values():
        assert abs(v.sum().item() - 1) < 1e-12


def test_masked_thought_schedule_and_corruption():
    from mixtune.train.losses import mask_thought, masked_thought_rate

    # min(p, p * step / (0.66 * total + 1)) with p = 0.4, total 100: 0 at step 0, 0.4 * 33.5 / 67 = 0.2, capped at 0.4
    assert masked_thought_rate(0, 100, 0.4) == 0
    assert abs(masked_thought_rate(33.5, 100, 0.4) - 0.2) < 1e-12
    assert masked_thought_rate(90, 100, 0.4) == 0.4
    ids = torch.arange(10, 110).reshape(1, 100)
    labels = torch.where(torch.arange(100) < 40, -100, ids)  # a 40-token prompt, then the response
    out = mask_thought(ids, labels, 0.5, torch.Generator().manual_seed(0), vocab_size=5000, mask_id=3)
    assert torch.equal(out[:, :40], ids[:, :40])  # the prompt is never touched
    hit = out[:, 40:] != ids[:, 40:]
    assert 15 <= hit.sum() <= 45 and (out[:, 40:][hit] == 3).all()
    rnd = mask_thought(ids, labels, 1.0, torch.Generator().manual_seed(0), vocab_size=5000)
    assert (rnd[:, 40:] != ids[:, 40:]).float().mean() > 0.9 and rnd.max() < 5000
