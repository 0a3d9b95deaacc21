"""CoBa: slopes and weights by hand, and a CoBa stage trained end to end."""

import json
import math

import numpy as np
import pytest

from mixtune.strategy.mixing.coba import coba_weights, slope


def test_coba_weights_by_hand_and_a_coba_stage(tiny_dir, tmp_path):
    assert slope(np.array([0.0, 1, 2]), np.array([3.0, 2, 1])) == pytest.approx(-1.0)
    assert slope(np.array([0.0, 1, 2]), np.array([3.0, 0, 0])) == 0.0  # zero losses are left out: one point
    # two tasks, latest slopes -2 (fast) and -1 (slow), one step of history, largest-loss slope -1.5:
    # RCS = softmax(2 [-2, -1] / 3); ACS = softmax(-1 * [-2, -1] / [2, 1]) = (1/2, 1/2);
    # DF = 1 * softmax([-1 * -1.5 / 1.5 * 5])[0] = 1; w = softmax(2 RCS): the slower task gets more weight
    w = coba_weights(np.array([[-2.0], [-1.0]]), np.array([-1.5]), start=0, tau=5.0)
    r1 = 1 / (1 + math.exp(2 / 3))
    rcs = np.array([r1, 1 - r1])
    want = np.exp(2 * rcs) / np.exp(2 * rcs).sum()
    assert np.allclose(w, want) and w[1] > w[0]
    # a weight under 1/(10 K) is lifted: w (1 - K/(10K)) + 1/(10K)
    low = coba_weights(np.array([[-100.0], [1.0]]), np.array([1.0]), start=0, tau=5.0)
    assert low.min() >= 1 / 20 - 1e-12 and abs(low.sum() - 1) < 1e-12

    from mixtune.core import validate
    from mixtune.pipeline import run_training
    from mixtune.recipe import Recipe

    recipe = validate(Recipe, {
        "model": str(tiny_dir), "format": {"seq_len": 96},
        "sources": {"math": {"builtin": "math", "n": 60}, "general": {"builtin": "general", "n": 30}},
        "strategy": {"name": "multi_task", "mixing": {"name": "coba", "warmup": 2, "history": 3, "validation": 4}},
        "train": {"lr": 3e-3, "steps": 5, "batch_size": 6, "micro_batch_size": 6, "precision": "fp32"},
        "run": {"log_every": 1}})
    run_training(recipe, tiny_dir, tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    weights = [(e["mix/math"], e["mix/general"]) for e in log if "mix/math" in e]
    assert weights[0] == (0.5, 0.5) and weights[-1] != (0.5, 0.5)  # equal during warm-up, then balanced
    assert all(abs(sum(w) - 1) < 1e-9 for w in weights)
