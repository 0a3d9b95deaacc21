"""DoReMi: the update by hand, the mixer's excess bookkeeping, and a proxy run against a reference."""

import json
import math

import numpy as np
import torch

from mixtune.strategy.mixing import Groups, StageRows, make_mixer
from mixtune.strategy.mixing.doremi import DoremiParams, doremi_update


def test_doremi_update_by_hand_and_end_to_end(tiny_dir, tmp_path):
    # alpha (1/2, 1/2), excess (2, -1) -> clipped (2, 0); mu 0.5: logits log(.5) + (1, 0) -> softmax (e/(e+1), 1/(e+1));
    # eps 0.1: 0.9 alpha + 0.05
    a = doremi_update(np.array([0.5, 0.5]), np.array([2.0, -1.0]), step_size=0.5, smoothing=0.1)
    e = math.e
    assert np.allclose(a, [0.9 * e / (e + 1) + 0.05, 0.9 / (e + 1) + 0.05])
    groups = Groups(["a", "b"], [torch.arange(0, 4), torch.arange(4, 8)], [])
    mixer = make_mixer(DoremiParams(reference="ref", step_size=1.0, smoothing=0.0),
                       StageRows(n_rows=8, batch_size=4, seed=0, stage=0, groups=groups))
    assert mixer.reference == "ref" and not mixer.wants_validation(0, after=False)
    mixer.observe_batch(0, np.array([2.0, np.nan]), np.array([1.0, 1.0]))  # b absent: its previous excess (0)
    assert np.allclose(mixer.loss_weights(), [e / (e + 1), 1 / (e + 1)])
    assert sorted(r // 4 for r in mixer.rows(0)) == [0, 0, 1, 1]  # batches stay stratified
    assert np.allclose(mixer.average_alpha(), mixer.alpha)
    assert mixer.summary() == {"doremi_average": mixer.alpha.tolist(), "groups": ["a", "b"]}

    from mixtune.core import validate
    from mixtune.pipeline import run_training
    from mixtune.recipe import Recipe

    def recipe(mixing, steps):
        return validate(Recipe, {
            "model": str(tiny_dir), "format": {"seq_len": 96},
            "sources": {n: {"builtin": n, "n": 40} for n in ("math", "general")},
            "strategy": {"name": "multi_task", "mixing": mixing},
            "train": {"lr": 3e-3, "steps": steps, "batch_size": 4, "micro_batch_size": 2, "precision": "fp32"},
            "run": {"log_every": 1}})

    # a reference trained a little (lower loss than the proxy, which starts from the base): positive excess
    (ref,) = run_training(recipe({"name": "stratified", "validation": 4}, 12), tiny_dir, tmp_path / "ref",
                          progress=False)
    run_training(recipe({"name": "doremi", "reference": str(ref), "step_size": 1.0, "validation": 4}, 4), tiny_dir,
                 tmp_path / "proxy", progress=False)
    log = [json.loads(line) for line in (tmp_path / "proxy" / "log.jsonl").read_text().splitlines()]
    alphas = [(x["mix/math"], x["mix/general"]) for x in log if "mix/math" in x]
    assert len(alphas) == 4 and alphas[-1] != (0.5, 0.5) and all(abs(sum(p) - 1) < 1e-9 for p in alphas)
    average = next(x for x in log if "doremi_average" in x)["doremi_average"]
    assert np.allclose(average, np.mean(alphas, axis=0))
