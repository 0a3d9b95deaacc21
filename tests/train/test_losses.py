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
