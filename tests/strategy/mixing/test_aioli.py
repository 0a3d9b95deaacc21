"""Aioli: the update on a given A, the round schedule, and a mixed stage trained end to end (and
resumed), with a static stage beside it."""

import json
import math

import numpy as np
import pytest
import torch

from mixtune.strategy.mixing import Groups, StageRows, make_mixer
from mixtune.strategy.mixing.aioli import AioliParams, aioli_update, smoothed_one_hot


def test_aioli_update_by_hand():
    # f = 1 (no smoothing): A^ = [[.4, 0], [.1, .1]] has no negative entry; / its sum .6 -> [[2/3, 0], [1/6, 1/6]];
    # column sums [5/6, 1/6]; cumulative: p = [.5 e^(5/6), .5 e^(1/6)] normalised (eta 1)
    p, a = aioli_update(np.array([0.5, 0.5]), np.array([[0.4, 0.0], [0.1, 0.1]]), f=1.0, eta=1.0)
    want = math.exp(5 / 6) / (math.exp(5 / 6) + math.exp(1 / 6))
    assert np.allclose(a, [[2 / 3, 0], [1 / 6, 1 / 6]]) and np.isclose(p[0], want)
    # a negative entry shifts A by its minimum first: [[.2, -.2], [0, .2]] -> [[.4, 0], [.2, .4]] / 1.0
    _, a = aioli_update(np.array([0.5, 0.5]), np.array([[0.2, -0.2], [0.0, 0.2]]), f=1.0, eta=1.0)
    assert np.allclose(a, [[0.4, 0.0], [0.2, 0.4]])
    # smoothing undone: probes with w_j = (.75, .25) / (.25, .75) measure A^[i, j] = sum_k A[i, k] w_j[k]
    true = np.array([[0.3, 0.1], [0.2, 0.4]])
    w = np.stack([smoothed_one_hot(2, j, 0.75) for j in range(2)])
    _, a = aioli_update(np.array([0.5, 0.5]), true @ w.T, f=0.75, eta=1.0)
    assert np.allclose(a, true / true.sum())
    # ema: Abar = (1 - g) A + g Abar_prev and p = exp(eta colsum(Abar)), not cumulative
    prev = np.array([[0.0, 1.0], [0.0, 0.0]])
    p, used = aioli_update(np.array([0.9, 0.1]), np.array([[1.0, 0.0], [0.0, 0.0]]), f=1.0, eta=2.0, ema=0.5,
                           a_bar=prev)
    assert np.allclose(used, [[0.5, 0.5], [0.0, 0.0]]) and np.allclose(p, [0.5, 0.5])


def aioli(cfg: AioliParams):
    groups = Groups(["a", "b", "c"], [torch.arange(0, 10), torch.arange(10, 20), torch.arange(20, 30)], [])
    return make_mixer(cfg, StageRows(n_rows=30, batch_size=6, seed=0, stage=0, groups=groups))


def test_the_aioli_round_probes_each_group_then_trains_on_p():
    cfg = AioliParams(round_steps=10, probe_rounds=1, probe_steps=2, one_hot=1.0, eta=1.0)
    mixer = aioli(cfg)
    order = mixer._order(0)
    assert sorted(order) == [0, 1, 2]
    assert mixer.wants_validation(0, after=False) and not mixer.wants_validation(1, after=False)
    assert [s for s in range(10) if mixer.wants_validation(s, after=True)] == [1, 3, 5]
    assert np.array_equal(mixer.mixture(0), np.eye(3)[order[0]]) and np.array_equal(mixer.mixture(3), np.eye(3)[order[1]])
    # a probe of group j with f = 1 draws only j's rows
    assert all(r // 10 == order[0] for r in mixer.rows(0))
    # losses: 3, 3, 3 at the start; probing group order[0] lowers only its own loss by 1, the others by 0
    mixer.observe(0, [3.0, 3.0, 3.0], after=False)
    losses = np.array([3.0, 3.0, 3.0])
    for k, j in enumerate(order):
        losses[j] -= 1.0 if j != 2 else 0.5  # group 2 learns slower
        mixer.observe(2 * k + 1, losses.copy(), after=True)
    # A = diag(1, 1, .5) / 2.5; p ∝ exp(colsum) = exp([.4, .4, .2])
    want = np.exp([0.4, 0.4, 0.2]) / np.exp([0.4, 0.4, 0.2]).sum()
    assert np.allclose(mixer.mixture(6), want) and np.allclose(mixer.p, want)
    assert mixer.summary()["mixing_rounds"][0]["step"] == 6 and mixer.loss_weights() is None
    assert list(mixer.log(6).values()) == pytest.approx(want)
    restored = aioli(cfg)
    restored.load_state_dict(json.loads(json.dumps(mixer.state_dict())))
    assert np.allclose(restored.mixture(7), want)


def test_a_mixed_stage_trains_logs_proportions_and_resumes_exactly(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    from mixtune.core import validate
    from mixtune.pipeline import run_training
    from mixtune.recipe import Recipe

    def recipe(mixing, **run):
        return validate(Recipe, {
            "model": str(tiny_dir), "format": {"seq_len": 96},
            "sources": {n: {"builtin": n, "n": 60} for n in ("math", "code", "general")},
            "strategy": {"name": "multi_task", "mixing": mixing},
            "train": {"lr": 1e-3, "steps": 8, "batch_size": 6, "micro_batch_size": 6, "precision": "fp32"},
            "run": {"log_every": 1} | run})

    aioli = {"name": "aioli", "round_steps": 5, "probe_rounds": 1, "probe_steps": 1, "one_hot": 0.5,
             "eta": 1.0, "validation": 8}
    full = run_training(recipe(aioli), tiny_dir, tmp_path / "a", progress=False)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "mix/math" in e]
    assert len(steps) == 8 and "val_loss/general" in steps[-1]
    # steps 0-2 probe (smoothed one-hots: one source at 1/2), 3-4 train on the learned p, then a new round
    assert sorted(round(steps[0][f"mix/{g}"], 3) for g in ("math", "code", "general")) == [0.25, 0.25, 0.5]
    rounds = next(e for e in log if "mixing_rounds" in e)["mixing_rounds"]
    assert len(rounds) == 2 and abs(sum(rounds[0]["p"]) - 1) < 1e-9
    assert [steps[3][f"mix/{g}"] for g in ("math", "code", "general")] == pytest.approx(rounds[0]["p"])

    class Killed(Exception):
        pass

    def kill(step):
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        run_training(recipe(aioli, save_every=2), tiny_dir, tmp_path / "b", progress=False, on_step=kill)
    resumed = run_training(recipe(aioli, save_every=2), tiny_dir, tmp_path / "b", progress=False)
    a, b = load_file(full[-1] / "model.safetensors"), load_file(resumed[-1] / "model.safetensors")
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    static = run_training(recipe({"name": "static", "weights": {"math": 1.0}, "validation": 8}), tiny_dir,
                          tmp_path / "c", progress=False)
    log = [json.loads(line) for line in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    last = [e for e in log if "mix/math" in e][-1]
    assert last["mix/math"] == 1.0 and "loss/code" not in last and static
