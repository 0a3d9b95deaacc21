"""Mixing modes: the registry, the interface every mode keeps (state round trips), batch counts,
the shuffled order, and the checks a mode makes when the recipe is read."""

import json

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter

from mixtune.core import ConfigError
from mixtune.strategy.mixing import MIXING_MODES, Groups, MixingConfig, StageRows, batch_counts, grouped, make_mixer

NAMES = ["a", "b", "c"]


def stage_rows(batch_size=8, seed=0, stage=0, sizes=(10, 7, 5)) -> StageRows:
    starts = np.cumsum([0, *sizes])
    groups = Groups(NAMES, [torch.arange(int(lo), int(hi)) for lo, hi in zip(starts, starts[1:])], [])
    return StageRows(int(starts[-1]), batch_size, seed, stage, groups)


PARAMS = {"shuffled": {}, "stratified": {}, "static": {"weights": {"a": 1.0, "c": 3.0}},
          "aioli": {"round_steps": 6, "probe_rounds": 1, "probe_steps": 1}, "doremi": {"reference": "ref"},
          "coba": {"warmup": 2, "history": 3}}


def test_the_registry_lists_every_mode_and_each_parses_from_its_recipe_keys():
    assert MIXING_MODES.names() == ["shuffled", "stratified", "static", "aioli", "doremi", "coba"]
    assert set(PARAMS) == set(MIXING_MODES)  # the contract test below covers every mode
    adapter = TypeAdapter(MixingConfig)
    for name, extra in PARAMS.items():
        cfg = adapter.validate_python({"name": name, **extra})
        assert type(cfg) is MIXING_MODES.get(name).params and grouped(cfg) == (name != "shuffled")
    assert not grouped(None)
    # each mode's config holds only its own fields: another mode's key is an error
    with pytest.raises(Exception, match="round_steps"):
        adapter.validate_python({"name": "stratified", "round_steps": 5})
    with pytest.raises(Exception, match="aiolli"):
        adapter.validate_python({"name": "aiolli"})


@pytest.mark.parametrize("name", list(PARAMS))
def test_every_mode_resumes_from_its_state_dict_exactly(name):
    """Run a mode 7 steps on made-up losses, save its state after 3 (through JSON), restore it into a
    fresh mixer: the rows, loss weights, log entries and summary of steps 3-6 are the same."""
    cfg = TypeAdapter(MixingConfig).validate_python({"name": name, **PARAMS[name]})

    def run(mixer, steps, seen):
        for step in steps:
            losses = np.array([3.0, 2.0, 1.0]) - 0.1 * step
            if mixer.wants_validation(step, after=False):
                mixer.observe(step, losses, after=False)
            rows = mixer.rows(step)
            w = mixer.loss_weights()
            if mixer.reference is not None:
                mixer.observe_batch(step, losses + 0.05 * np.arange(3), losses)
            if mixer.wants_validation(step, after=True):
                mixer.observe(step, losses - 0.05 * np.arange(3), after=True)
            seen.append((rows, None if w is None else w.tolist(), mixer.log(step)))

    full, seen = make_mixer(cfg, stage_rows()), []
    run(full, range(7), seen)
    first, part = make_mixer(cfg, stage_rows()), []
    run(first, range(3), part)
    resumed = make_mixer(cfg, stage_rows())
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    run(resumed, range(3, 7), part)
    assert part == seen and resumed.summary() == full.summary()
    assert all(len(rows) == 8 for rows, *_ in seen)
    if name == "shuffled":  # no `mixing` is this mode
        assert seen == [(make_mixer(None, stage_rows()).rows(step), None, {}) for step in range(7)]
    else:
        assert {k for *_, entry in seen for k in entry} == {"mix/a", "mix/b", "mix/c"}


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


def test_shuffled_walks_each_epoch_once_and_is_seeded():
    def order(stage):
        mixer = make_mixer(None, StageRows(n_rows=10, batch_size=4, seed=0, stage=stage))
        return [r for step in range(5) for r in mixer.rows(step)]  # 20 rows = 2 epochs

    first = order(1)
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    assert first == order(1) and first != order(2)


def test_stratified_and_static_draw_their_proportions():
    strat = make_mixer(TypeAdapter(MixingConfig).validate_python({"name": "stratified"}), stage_rows(batch_size=6))
    static_cfg = TypeAdapter(MixingConfig).validate_python(PARAMS["static"] | {"name": "static"})
    static = make_mixer(static_cfg, stage_rows(batch_size=8))
    groups = stage_rows().groups

    def per_group(rows):
        return [sum(int(r) in set(g.tolist()) for r in rows) for g in groups.rows]

    assert per_group(strat.rows(0)) == [2, 2, 2] and strat.log(0) == pytest.approx({f"mix/{g}": 1 / 3 for g in NAMES})
    assert per_group(static.rows(0)) == [2, 0, 6] and static.log(0) == {"mix/a": 0.25, "mix/b": 0.0, "mix/c": 0.75}
    # group a has 10 rows: 5 batches of 2 walk one permutation of them, the next 5 another one
    static = make_mixer(static_cfg, stage_rows(batch_size=8))
    drawn = [r for step in range(10) for r in static.rows(step) if r < 10]
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10)) and drawn[:10] != drawn[10:]


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text("model: builtin:tiny\nsources:\n  math: {builtin: math, n: 20}\n  code: {builtin: code, n: 20}\n"
                    + text)
    return path


def test_mode_checks_fail_when_the_recipe_is_read(tmp_path):
    from mixtune.recipe import load_recipe

    # DoReMi without its reference model, at the key's line
    with pytest.raises(ConfigError, match=r"r.yaml:7 strategy.mixing.reference: Field required"):
        load_recipe(write(tmp_path, "strategy:\n  name: multi_task\n  mixing: {name: doremi}\n"))
    # ... or with a folder that does not exist
    with pytest.raises(ConfigError, match="no model folder 'nowhere' \\(DoReMi's reference model"):
        load_recipe(write(tmp_path, "strategy:\n  name: multi_task\n  mixing: {name: doremi, reference: nowhere}\n"))
    # static weights of a source the stage does not train on: the strategy's key, or the stage's line
    with pytest.raises(ConfigError, match=r"strategy.mixing.weights \{'general': 1.0\}: give positive weights for "
                                          r"this stage's sources \(math, code\)"):
        load_recipe(write(tmp_path, "strategy:\n  name: multi_task\n  mixing: {name: static, weights: {general: 1}}\n"))
    with pytest.raises(ConfigError, match=r"r.yaml:\d+.*mixing.weights \{'math': 0.0\}: give positive weights"):
        load_recipe(write(tmp_path, "stages:\n  - name: one\n    mixture: {sources: {math: {}, code: {}}}\n"
                                    "    mixing: {name: static, weights: {math: 0}}\n"))
    cfg, _ = load_recipe(write(tmp_path, "strategy:\n  name: multi_task\n  mixing: {name: static, weights: {math: 1}}\n"))
    assert cfg.resolved_stages()[0].mixing.weights == {"math": 1.0}


@pytest.mark.slow
def test_dry_run_reports_a_mode_check(tmp_path):
    import subprocess
    import sys

    recipe = write(tmp_path, "strategy:\n  name: multi_task\n  mixing: {name: doremi, step_size: 0.1}\n")
    out = subprocess.run([sys.executable, "-m", "mixtune.cli", "train", str(recipe), "--dry-run", "--no-estimate"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "strategy.mixing.reference: Field required" in out.stderr and "nothing trained" not in out.stdout
