"""Online mixing: the Aioli update on a given A, the round schedule, batch counts, and a mixed
stage trained end to end (and resumed)."""

import json
import math

import numpy as np
import pytest

from mixtune.strategy.online import MixingConfig, OnlineMixer, aioli_update, batch_counts, smoothed_one_hot


def test_batch_counts_carry_fractions_so_shares_hold_over_steps():
    # owed 4, 2.4, 1.6 -> floors 4, 2, 1; the row left goes to the largest remainder (.6): 4, 2, 2;
    # carried: 0, .4, -.4
    counts, carry = batch_counts(np.array([0.5, 0.3, 0.2]), 8)
    assert counts.tolist() == [4, 2, 2] and np.allclose(carry, [0, 0.4, -0.4])
    # next batch: owed 4, 2.8, 1.2 -> 4, 2, 1 + the left row to the group owed .8: 4, 3, 1
    counts, carry = batch_counts(np.array([0.5, 0.3, 0.2]), 8, carry)
    assert counts.tolist() == [4, 3, 1] and np.allclose(carry, [0, -0.2, 0.2])
    # uniform over 3 groups at batch 8: 3, 3, 2 then 3, 2, 3 then 2, 3, 3 (the floor rule would give 2, 2, 4 each time)
    carry, seen = None, []
    for _ in range(3):
        counts, carry = batch_counts(np.full(3, 1 / 3), 8, carry)
        seen.append(counts.tolist())
    assert seen == [[3, 3, 2], [3, 2, 3], [2, 3, 3]]
    assert batch_counts(np.array([1.0, 0.0]), 5)[0].tolist() == [5, 0]


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


def test_the_aioli_round_probes_each_group_then_trains_on_p():
    cfg = MixingConfig(name="aioli", round_steps=10, probe_rounds=1, probe_steps=2, one_hot=1.0, eta=1.0)
    mixer = OnlineMixer(cfg, ["a", "b", "c"], seed=0, stage=0)
    order = mixer._order(0)
    assert sorted(order) == [0, 1, 2]
    assert mixer.wants_eval(0, after=False) and not mixer.wants_eval(1, after=False)
    assert [s for s in range(10) if mixer.wants_eval(s, after=True)] == [1, 3, 5]
    assert np.array_equal(mixer.mixture(0), np.eye(3)[order[0]]) and np.array_equal(mixer.mixture(3), np.eye(3)[order[1]])
    # losses: 3, 3, 3 at the start; probing group order[0] lowers only its own loss by 1, the others by 0
    mixer.observe(0, [3.0, 3.0, 3.0], after=False)
    losses = np.array([3.0, 3.0, 3.0])
    for k, j in enumerate(order):
        losses[j] -= 1.0 if j != 2 else 0.5  # group 2 learns slower
        mixer.observe(2 * k + 1, losses.copy(), after=True)
    # A = diag(1, 1, .5) / 2.5; p ∝ exp(colsum) = exp([.4, .4, .2])
    want = np.exp([0.4, 0.4, 0.2]) / np.exp([0.4, 0.4, 0.2]).sum()
    assert np.allclose(mixer.mixture(6), want) and np.allclose(mixer.p, want)
    assert mixer.history[0]["step"] == 6
    restored = OnlineMixer(cfg, ["a", "b", "c"], seed=0, stage=0)
    restored.load_state_dict(json.loads(json.dumps(mixer.state_dict())))
    assert np.allclose(restored.mixture(7), want)
    with pytest.raises(Exception, match="positive weights"):
        OnlineMixer(MixingConfig(name="static", weights={"z": 1.0}), ["a", "b"], 0, 0)


def test_a_mixed_stage_trains_logs_proportions_and_resumes_exactly(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    from mixtune.core import validate
    from mixtune.pipeline import run_training
    from mixtune.recipe import Recipe

    def recipe(mixing, **train):
        return validate(Recipe, {
            "model": str(tiny_dir), "format": {"seq_len": 96},
            "sources": {n: {"builtin": n, "n": 60} for n in ("math", "code", "general")},
            "strategy": {"name": "multi_task", "mixing": mixing},
            "train": {"lr": 1e-3, "steps": 8, "batch_size": 6, "micro_batch_size": 6, "precision": "fp32",
                      "log_every": 1} | train})

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


def test_doremi_update_by_hand_and_end_to_end(tiny_dir, tmp_path):
    from mixtune.strategy.online import doremi_update

    # alpha (1/2, 1/2), excess (2, -1) -> clipped (2, 0); mu 0.5: logits log(.5) + (1, 0) -> softmax (e/(e+1), 1/(e+1));
    # eps 0.1: 0.9 alpha + 0.05
    a = doremi_update(np.array([0.5, 0.5]), np.array([2.0, -1.0]), step_size=0.5, smoothing=0.1)
    e = math.e
    assert np.allclose(a, [0.9 * e / (e + 1) + 0.05, 0.9 / (e + 1) + 0.05])
    mixer = OnlineMixer(MixingConfig(name="doremi", reference="ref", step_size=1.0, smoothing=0.0), ["a", "b"], 0, 0)
    mixer.observe_excess(0, np.array([2.0, np.nan]), np.array([1.0, 1.0]))  # b absent: its previous excess (0)
    assert np.allclose(mixer.alpha, [e / (e + 1), 1 / (e + 1)]) and np.array_equal(mixer.mixture(0), [0.5, 0.5])
    assert np.allclose(mixer.average_alpha(), mixer.alpha)
    with pytest.raises(Exception, match="needs `reference`"):
        OnlineMixer(MixingConfig(name="doremi"), ["a", "b"], 0, 0)

    from mixtune.core import validate
    from mixtune.pipeline import run_training
    from mixtune.recipe import Recipe

    def recipe(mixing, steps):
        return validate(Recipe, {
            "model": str(tiny_dir), "format": {"seq_len": 96},
            "sources": {n: {"builtin": n, "n": 40} for n in ("math", "general")},
            "strategy": {"name": "multi_task", "mixing": mixing},
            "train": {"lr": 3e-3, "steps": steps, "batch_size": 4, "micro_batch_size": 2, "precision": "fp32",
                      "log_every": 1}})

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


def test_coba_weights_by_hand_and_a_coba_stage(tiny_dir, tmp_path):
    from mixtune.strategy.online import coba_weights, slope

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
        "train": {"lr": 3e-3, "steps": 5, "batch_size": 6, "micro_batch_size": 6, "precision": "fp32",
                  "log_every": 1}})
    run_training(recipe, tiny_dir, tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    weights = [(e["mix/math"], e["mix/general"]) for e in log if "mix/math" in e]
    assert weights[0] == (0.5, 0.5) and weights[-1] != (0.5, 0.5)  # equal during warm-up, then balanced
    assert all(abs(sum(w) - 1) < 1e-9 for w in weights)
