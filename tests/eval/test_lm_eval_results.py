"""Scores exported in lm-evaluation-harness's results JSON layout: the same "results" (means and lm-eval's
standard errors) and the same keys as lm-eval 0.4.13 writes for the same local tasks and model, and a
file lm-eval's own table formatter reads."""

import dataclasses
import json
import os
import sys
import textwrap
import time

import pytest

from mixtune.eval import AbilityScore, evaluate, load_for_eval, parse_abilities
from mixtune.eval.lm_eval_results import RESULTS_FILE, lm_eval_results, lm_eval_sources, metrics_of, stderr
from mixtune.eval.tasks import ChoiceTask, CodeTask, GenerateTask

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a test extra (pip install -e '.[test]')")
from lm_eval.api.metrics import mean_stderr  # noqa: E402
from lm_eval.utils import handle_non_serializable, make_table  # noqa: E402
from test_lm_eval_tasks import MC, mc_yaml, task_yaml, write_data  # noqa: E402  (tests/eval, on pytest's path)


def table_tasks(res: dict) -> list[str]:
    """The task column of lm-eval's markdown table of ``res`` (first cell of each row that names one)."""
    rows = [line.split("|")[1].strip() for line in make_table(res).splitlines()[2:]]
    return [r for r in rows if r]


def test_stderr_is_lm_evals_mean_stderr():
    for values in ([1.0, 0.0, 1.0, 1.0, 0.0], [0.25, 0.5, 1.0], [0.0, 0.0]):
        assert stderr(values) == pytest.approx(mean_stderr(values), abs=1e-12)
    # sqrt(((1 - .6)^2 * 3 + .6^2 * 2) / 4) / sqrt(5) = sqrt(0.3) / sqrt(5), not the binomial sqrt(.6 * .4 / 5)
    assert stderr([1.0, 0.0, 1.0, 1.0, 0.0]) == pytest.approx((0.3 / 5) ** 0.5, abs=1e-12)
    assert stderr([1.0]) == "N/A"  # lm-eval writes N/A below two items


def test_every_kind_of_ability_gets_an_honest_metric_name(tmp_path, tiny_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(4)))
    exact, numeric = GenerateTask(path=data), GenerateTask(path=data, scorer="numeric", fewshot=2, fewshot_path=data)
    code, choice = CodeTask(path=data, samples=2, k=[1, 2]), ChoiceTask(path=data)

    def scored(name, **per_item):
        n = len(next(iter(per_item.values())))
        ex = [{k: v[i] for k, v in per_item.items()} for i in range(n)]
        return AbilityScore(name, sum(ex[i].get("score", 0.0) for i in range(n)) / n, n, 3, examples=ex)

    scores = {"math": scored("math", score=[1.0, 0.0, 0.0]),
              "ex": scored("ex", score=[1.0, 1.0, 0.0]),
              "num": scored("num", score=[1.0]),
              "he": scored("he", **{"pass@1": [0.5, 0.0, 1.0], "pass@2": [1.0, 0.0, 1.0]}, score=[0.5, 0.0, 1.0]),
              "mc": scored("mc", acc=[1.0, 0.0, 1.0, 1.0], acc_norm=[0.0, 0.0, 1.0, 1.0], score=[1.0, 0.0, 1.0, 1.0])}
    tasks = {"ex": exact, "num": numeric, "he": code, "mc": choice}
    assert [(m, f) for m, f, _, _ in metrics_of(scores["num"], numeric)] == [("exact_match", "numeric-last_number")]
    model, tok = load_for_eval(tiny_dir)
    res = lm_eval_results(scores, model=model, tokenizer=tok, model_path=str(tiny_dir), n=4, batch_size=2, seed=7,
                          tasks=tasks, started=1.0e9, seconds=2.5)
    r = res["results"]
    assert r["math"] == {"name": "math", "alias": "math", "sample_len": 3, "exact_match,answer-line": 1 / 3,
                         "exact_match_stderr,answer-line": pytest.approx(mean_stderr([1.0, 0.0, 0.0]), abs=1e-12)}
    assert r["ex"]["exact_match,none"] == pytest.approx(2 / 3, abs=1e-12)
    assert r["num"]["exact_match,numeric-last_number"] == 1.0
    assert r["num"]["exact_match_stderr,numeric-last_number"] == "N/A"
    assert r["he"]["pass@1,none"] == 0.5 and r["he"]["pass@2,none"] == pytest.approx(2 / 3, abs=1e-12)
    assert r["he"]["pass@2_stderr,none"] == pytest.approx(mean_stderr([1.0, 0.0, 1.0]), abs=1e-12)
    assert [k for k in r["mc"] if "," in k] == ["acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"]
    assert r["mc"]["acc_norm,none"] == 0.5
    assert res["n-shot"] == {"ex": 0, "he": 0, "math": 0, "mc": 0, "num": 2}
    assert res["n-samples"]["ex"] == {"original": 4, "effective": 3}  # the file's records, the scored ones
    assert res["n-samples"]["math"] == {"original": 3, "effective": 3}  # a built-in set is the n it generates
    assert res["versions"]["math"] == 3 and res["configs"]["math"]["metadata"] == {"version": 3, "difficulty": 1,
                                                                                     "seed": 7}
    assert res["higher_is_better"]["he"] == {"pass@1": True, "pass@2": True}
    assert res["configs"]["num"]["scorer"] == "numeric" and res["configs"]["num"]["task"] == "num"
    assert res["config"]["limit"] == 4 and res["config"]["batch_size"] == 2 and res["date"] == 1.0e9
    assert res["total_evaluation_time_seconds"] == "2.5" and "max_length" in res  # a choice task ran
    assert sorted(table_tasks(res)) == sorted(scores)  # lm-eval's own formatter: one row per task


def lm_eval_run(model_dir, folders, names, limit):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=names, device="cpu",
                           task_manager=TaskManager(include_path=[str(f) for f in folders], include_defaults=False),
                           batch_size=4, limit=limit, log_samples=False)


def test_the_same_results_and_layout_as_lm_eval(sharp_dir, tmp_path):
    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker

    sharp = sharp_dir  # sharpened weights, so the choices are not near ties
    model, tok = load_for_eval(sharp)
    plain, rx, mc = (tmp_path / d for d in ("plain", "rx", "mc"))
    for folder in (plain, rx, mc):
        folder.mkdir()
    # generate_until: the references are the model's own outputs for some questions, so the means are not 0 or 1
    write_data(plain, ["?"] * 6)
    names, tasks = parse_abilities(str(task_yaml(plain, "x_plain")))
    outputs = [e["output"] for e in evaluate(model, tok, names, n=6, tasks=tasks)["x_plain"].examples]
    write_data(plain, [o if i % 2 == 0 else "no" for i, o in enumerate(outputs)])
    write_data(rx, [(o.split() or ["?"])[0] if i == 1 else "no" for i, o in enumerate(outputs)])
    task_yaml(rx, "x_rx", "filter_list:\n  - name: first\n    filter:\n      - {function: regex, "
                          "regex_pattern: '(\\S+)'}\n      - {function: take_first}\n")
    mc_yaml(mc, "x_mc", "metadata:\n  version: 3\n")  # no metric_list: lm-eval's defaults, acc and acc_norm
    # and the gold choice is the model's pick for some questions, so acc is not 0 or 1 either
    names, tasks = parse_abilities(str(mc / "x_mc.yaml"))
    picks = [e["pred"] for e in evaluate(model, tok, names, n=6, tasks=tasks)["x_mc"].examples]
    (mc / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": p if i % 2 == 0 else
                                                     (p + 1) % len(c)}) + "\n"
                                         for i, ((q, c, _), p) in enumerate(zip(MC, picks))))
    names_arg = f"{mc / 'x_mc.yaml'},{plain / 'x_plain.yaml'},{rx / 'x_rx.yaml'}"
    names, tasks = parse_abilities(names_arg)
    scores = evaluate(model, tok, names, n=5, batch_size=4, tasks=tasks)
    ours = lm_eval_results(scores, model=model, tokenizer=tok, model_path=str(sharp), n=5, batch_size=4, tasks=tasks,
                           sources=lm_eval_sources(names_arg), started=time.time(), seconds=1.0)
    # lm-eval's file: its dict as save_results_aggregated dumps it (the dtype as a string)
    theirs = json.loads(json.dumps(lm_eval_run(sharp, (mc, plain, rx), names, limit=5),
                                   default=handle_non_serializable))

    # results: the same keys in the same order, the same means and standard errors
    assert list(ours["results"]) == list(theirs["results"]) == ["x_mc", "x_plain", "x_rx"]
    for name, mine in ours["results"].items():
        assert list(mine) == list(theirs["results"][name]), name
        for key, value in mine.items():
            want = theirs["results"][name][key]
            assert value == (pytest.approx(want, abs=1e-9) if isinstance(want, float) else want), (name, key)
    means = [v for r in ours["results"].values() for k, v in r.items() if "," in k and "_stderr" not in k]
    assert len(means) == 4 and ours["results"]["x_mc"]["acc,none"] == 0.6  # acc, acc_norm, two exact_match
    assert ours["results"]["x_plain"]["exact_match,none"] == 0.6 and ours["results"]["x_rx"]["exact_match,first"] == 0.2
    assert "exact_match,first" in ours["results"]["x_rx"] and "exact_match,none" in ours["results"]["x_plain"]
    for key in ("group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples"):
        assert ours[key] == theirs[key], key
    assert ours["n-samples"]["x_mc"] == {"original": 6, "effective": 5}
    # configs: every key mixtune writes is lm-eval's, with lm-eval's value
    for name, cfg in ours["configs"].items():
        assert {k: theirs["configs"][name].get(k) for k in cfg} == cfg, name
    # config and the rest: a subset of lm-eval's keys (the tracker's fields are added when lm-eval saves the file)
    assert set(ours["config"]) <= set(theirs["config"])
    for key in ("model_num_parameters", "model_dtype", "batch_size", "batch_sizes", "device", "use_cache", "limit",
                "gen_kwargs"):
        assert ours["config"][key] == theirs["config"][key], key
    tracker = {f.name for f in dataclasses.fields(GeneralConfigTracker)}
    assert set(ours) - set(theirs) - tracker == {"mixtune_version"}
    for key in ("transformers_version", "tokenizer_pad_token", "tokenizer_eos_token", "tokenizer_bos_token",
                "eot_token_id", "max_length"):
        assert ours[key] == theirs[key], key
    assert isinstance(ours["date"], float) and isinstance(ours["git_hash"], (str, type(None)))
    # lm-eval's formatter prints mixtune's file exactly as it prints its own
    assert table_tasks(ours) == table_tasks(theirs) == ["x_mc", "x_plain", "x_rx"]
    assert make_table(json.loads(json.dumps(ours))) == make_table(theirs)


def test_the_cli_writes_the_file_beside_scores_json(tiny_dir, tmp_path, capsys, monkeypatch):
    from mixtune.cli import main

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["mixtune", "eval", str(tiny_dir), "--abilities", "math", "--n", "2",
                                      "--out", str(out)])
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None)
    assert RESULTS_FILE in capsys.readouterr().out
    res, scores = json.loads((out / RESULTS_FILE).read_text()), json.loads((out / "scores.json").read_text())
    assert res["results"]["math"]["exact_match,answer-line"] == scores["scores"]["math"]["score"]
    assert res["config"]["model_args"] == f"pretrained={tiny_dir}" and res["n-samples"]["math"]["effective"] == 2
    assert table_tasks(res) == ["math"]
