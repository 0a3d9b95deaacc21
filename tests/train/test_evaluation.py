"""Evaluation during training (train.eval): scores in the log, the same weights, the best kept."""

import json

import pytest
import torch

from mixtune.core import ConfigError
from mixtune.eval import evaluate, load_for_eval
from mixtune.pipeline import run_training
from mixtune.train.evaluation import best_value

from tests.train.test_loop import recipe, weights

EVAL = {"every": 4, "abilities": ["math", "general"], "n": 4, "keep_best": "mean"}
ONE = EVAL | {"abilities": ["general"]}  # cheaper: untrained models generate the whole budget


def evals_of(out):
    return [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if any(k.startswith("eval/") for k in e)]


def test_scores_are_logged_and_the_trained_weights_do_not_change(tiny_dir, tmp_path):
    plain = run_training(recipe(tiny_dir), tiny_dir, tmp_path / "plain", progress=False)
    scored = run_training(recipe(tiny_dir, eval=EVAL), tiny_dir, tmp_path / "scored", progress=False)
    for a, b in zip(plain, scored):  # two stages of 6 steps: the same weights and files, bit for bit
        for k, v in weights(a).items():
            assert torch.equal(v, weights(b)[k]), k
        for name in ("config.json", "tokenizer_config.json", "generation_config.json"):
            if (a / name).exists():
                assert (a / name).read_bytes() == (b / name).read_bytes(), name
    entries = evals_of(tmp_path / "scored")
    assert [e["step"] for e in entries] == [0, 4, 6, 8, 12]  # start, every 4, the stage ends 6 and 12
    assert [e["stage"] for e in entries] == ["1-specialists"] * 3 + ["2-general+k=0.25"] * 2
    assert entries[2]["stage_step"] == 6 and entries[3]["stage_step"] == 2
    # the score at a stage end is the score of the exported stage model
    model, tok = load_for_eval(scored[0])
    again = evaluate(model, tok, ["math", "general"], n=4)
    assert entries[2]["eval/math"] == again["math"].score and entries[2]["eval/general"] == again["general"].score
    # the best by the mean: the first step with the highest mean, its weights in best/
    means = [(e["eval/math"] + e["eval/general"]) / 2 for e in entries]
    top = entries[means.index(max(means))]
    best = json.loads((tmp_path / "scored" / "best" / "best.json").read_text())
    assert best["step"] == top["step"] and best["value"] == pytest.approx(max(means))
    model, tok = load_for_eval(tmp_path / "scored" / "best")
    assert {a: s.score for a, s in evaluate(model, tok, ["math", "general"], n=4).items()} == best["scores"]


def test_a_resumed_run_logs_each_evaluation_once_and_keeps_the_same_best(tiny_dir, tmp_path):
    cfg = recipe(tiny_dir, eval=ONE | {"keep_best": "general"}, save_every=3)
    full = run_training(cfg, tiny_dir, tmp_path / "full", progress=False)

    def kill_at_10(step):
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, tiny_dir, tmp_path / "r", progress=False, on_step=kill_at_10)
    resumed = run_training(cfg, tiny_dir, tmp_path / "r", progress=False)
    assert evals_of(tmp_path / "r") == [e | {"eval_seconds": e2["eval_seconds"]} for e, e2 in
                                        zip(evals_of(tmp_path / "full"), evals_of(tmp_path / "r"))]
    assert [e["step"] for e in evals_of(tmp_path / "r")] == [0, 4, 6, 8, 12]
    a, b = (json.loads((p / "best" / "best.json").read_text()) for p in (tmp_path / "full", tmp_path / "r"))
    assert a == b
    # a fresh run over the same folder evaluates everything again, not as the replaced run's
    run_training(cfg, tiny_dir, tmp_path / "r", progress=False, resume=False)
    first = json.loads((tmp_path / "r" / "log.jsonl").read_text().splitlines()[0])
    assert first["note"].startswith("starting over: deleted")  # the log holds this run alone
    assert [e["step"] for e in evals_of(tmp_path / "r")] == [0, 4, 6, 8, 12]
    assert json.loads((tmp_path / "r" / "best" / "best.json").read_text()) == a
    for k, v in weights(full[-1]).items():
        assert torch.equal(v, weights(resumed[-1])[k]), k


def test_lora_weights_are_scored_and_the_best_is_an_adapter(tiny_dir, tmp_path):
    cfg = recipe(tiny_dir, method={"name": "lora", "r": 4}, lr=5e-3, eval=ONE | {"every": 6})
    run_training(cfg, tiny_dir, tmp_path, progress=False)
    assert [e["step"] for e in evals_of(tmp_path)] == [0, 6, 12]
    assert (tmp_path / "best" / "adapter_config.json").exists()
    model, tok = load_for_eval(tmp_path / "best")
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert {a: s.score for a, s in evaluate(model, tok, ["general"], n=4).items()} == best["scores"]


def test_the_best_is_the_first_step_with_the_highest_value(tmp_path):
    from types import SimpleNamespace

    from mixtune.train.config import TrainEval
    from mixtune.train.evaluation import DuringTraining
    from mixtune.train.loop import TrainLog

    acc = SimpleNamespace(is_main_process=True, num_processes=1, unwrap_model=lambda m: m)
    values = iter([0.1, 0.3, 0.2, 0.3, 0.25, 0.5])
    log = TrainLog(tmp_path / "log.jsonl", enabled=True, echo=False)
    during = DuringTraining(TrainEval(every=2, abilities=["math"], keep_best="math"),
                            lambda model: {"math": next(values)}, acc=acc, log=log, tokenizer=None, out_dir=tmp_path)
    exported = []
    model = torch.nn.Linear(1, 1)
    for step in range(9):
        during.maybe(model, global_step=step, stage="s", stage_step=step, stage_end=step == 5,
                     export=lambda dest, best: exported.append(best["step"]))
    assert exported == [0, 2, 8]  # 0.1 at 0, 0.3 at 2; not 0.2 at 4, 0.3 at 5 (the stage end: a tie), 0.25 at 6
    assert model.training  # put back
    # resumed: the best so far comes back from the log
    again = DuringTraining(TrainEval(every=2, abilities=["math"], keep_best="math"), lambda model: {"math": 0.4},
                           acc=acc, log=log, tokenizer=None, out_dir=tmp_path)
    assert again.best == 0.5 and again.done == {0, 2, 4, 5, 6, 8}


def test_the_steps_evaluated_are_the_start_every_n_and_the_stage_ends():
    from mixtune.train.config import TrainEval
    from mixtune.train.evaluation import evaluation_steps

    assert evaluation_steps(TrainEval(every=4), [6, 6]) == [0, 4, 6, 8, 12]  # as the runs above log them
    assert evaluation_steps(TrainEval(every=100), [3, 5]) == [0, 3, 8]


def test_best_value_is_one_ability_or_the_weighted_mean():
    from mixtune.train.config import TrainEval

    scores = {"math": 0.5, "code": 0.2, "general": 0.8}
    assert best_value(TrainEval(keep_best="code"), scores) == 0.2
    assert best_value(TrainEval(keep_best="mean"), scores) == pytest.approx(0.5)
    assert best_value(TrainEval(keep_best="mean", weights={"math": 3}), scores) == pytest.approx((1.5 + 1.0) / 5)


@pytest.mark.parametrize("bad, message", [
    ({"keep_best": "maths"}, "keep_best = 'maths' is neither 'mean' nor one of abilities"),
    ({"weights": {"coding": 1}}, "weights names ['coding'], not in abilities"),
    ({"abilities": ["math", "missing.yaml"]}, "missing.yaml: no such task file"),
    ({"abilities": ["maths"]}, "maths"),
])
def test_bad_evaluation_settings_fail_before_training(tiny_dir, tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        run_training(recipe(tiny_dir, eval=EVAL | bad), tiny_dir, tmp_path, progress=False)
    assert not (tmp_path / "log.jsonl").exists()  # nothing trained
