"""lm-evaluation-harness task files as abilities: read as lm-eval reads them, and the same generations
and exact-match scores as lm-eval 0.4.13 itself on the same local task and model (a test extra, MIT)."""

import json
import os
import textwrap

import pytest

from mixtune.core import ConfigError
from mixtune.eval import evaluate, load_for_eval, parse_abilities
from mixtune.eval.lm_eval_tasks import from_lm_eval
from mixtune.models.prefix import shared_prefix

QUESTIONS = ["What is 2 + 3?", "Reverse the words: red blue", "What is 7 - 4?", "Sort: c a b", "Count: x x x",
             "Capitalise: hello"]


def lm_task(folder, name, data, body):
    """An lm-eval task file ``folder/NAME.yaml`` over the local JSONL file ``folder/DATA`` (the test split),
    then ``body`` (YAML, not indented)."""
    path = folder / f"{name}.yaml"
    path.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / data}\n"
                    f"test_split: test\n" + body)
    return path


def task_yaml(folder, name, extra=""):
    return lm_task(folder, name, "data.jsonl", textwrap.dedent("""\
        output_type: generate_until
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_target: "{{answer}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 12
        """) + textwrap.dedent(extra))


def write_data(folder, answers):
    (folder / "data.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                               for q, a in zip(QUESTIONS, answers)))


def test_a_task_is_read_with_its_template_stops_budget_and_metric(tmp_path):
    write_data(tmp_path, ["5"] * 6)
    path = task_yaml(tmp_path, "t", """\
        metric_list:
          - {metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true}
        """)
    (name, task), = from_lm_eval(path).items()
    assert name == "t" and task.template == "jinja" and task.prompt == "Question: {{question}}\nAnswer:"
    assert task.stop == ["\n"] and task.max_new_tokens == 12 and task.format == "plain"
    assert task.scorer == "exact" and task.scorer_options.ignore_case and not task.scorer_options.fold_whitespace


def test_what_is_not_read_is_one_line_naming_it(tmp_path):
    write_data(tmp_path, ["5"] * 6)
    hub = tmp_path / "hub.yaml"
    hub.write_text("task: gsm\ndataset_path: gsm8k\noutput_type: generate_until\ndoc_to_text: q\ndoc_to_target: a\n")
    with pytest.raises(ConfigError, match="dataset_path 'gsm8k' would be downloaded.*save the test split as JSONL"):
        from_lm_eval(hub)
    other = task_yaml(tmp_path, "o", "process_results: !!str x\n")
    with pytest.raises(ConfigError, match="lm-eval keys process_results are not read"):
        from_lm_eval(other)
    bleu = task_yaml(tmp_path, "b", "metric_list:\n  - metric: bleu\n")
    with pytest.raises(ConfigError, match=r"metric_list \['bleu'\]: only exact_match"):
        from_lm_eval(bleu)
    median = task_yaml(tmp_path, "m", "metric_list:\n  - {metric: exact_match, aggregation: median}\n")
    with pytest.raises(ConfigError, match="exact_match: aggregation 'median'; mixtune aggregates by the mean"):
        from_lm_eval(median)
    twice = task_yaml(tmp_path, "r", "repeats: 3\n")
    with pytest.raises(ConfigError, match="repeats 3: each item is answered once"):
        from_lm_eval(twice)


lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a test extra (pip install -e '.[test]')")


def lm_eval_samples(tiny_dir, folder, name):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    res = simple_evaluate(model="hf", model_args=f"pretrained={tiny_dir},dtype=float32", tasks=[name], device="cpu",
                          task_manager=TaskManager(include_path=str(folder)), log_samples=True, batch_size=4)
    samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
    return samples, res["results"][name]


def test_same_generations_and_exact_match_as_lm_eval(tiny_dir, tmp_path):
    model, tok = load_for_eval(tiny_dir)
    write_data(tmp_path, ["?"] * 6)
    plain = task_yaml(tmp_path, "plain_em")
    names, tasks = parse_abilities(str(plain))
    outputs = [e["output"] for e in evaluate(model, tok, names, n=6, tasks=tasks)["plain_em"].examples]
    # references: the model's own output for half the questions (upper-cased once), so both scores are non-trivial
    cased = next(i for i, o in enumerate(outputs) if o.upper() != o)  # an output with lower-case letters
    answers = [o.upper() if i == cased else o if i % 2 == 0 else "no" for i, o in enumerate(outputs)]
    write_data(tmp_path, answers)
    for name, extra in [("plain_em", ""),
                        ("nocase_em", "metric_list:\n  - {metric: exact_match, ignore_case: true}\n"),
                        ("regex_em", "filter_list:\n  - name: first\n    filter:\n      - {function: regex, "
                                     "regex_pattern: '(\\S+)'}\n      - {function: take_first}\n"),
                        # a description before every prompt: mixtune reads it once and continues from its cache
                        ("described_em", "description: \"The following are short questions about words and "
                                         "numbers, each answered in one line.\\n\\n\"\n")]:
        path = task_yaml(tmp_path, name, extra)
        names, tasks = parse_abilities(str(path))
        ours = evaluate(model, tok, names, n=6, tasks=tasks)[name]
        samples, summary = lm_eval_samples(tiny_dir, tmp_path, name)
        assert [s["arguments"][0][0] for s in samples] == [e["prompt"] for e in ours.examples]  # the same prompts
        assert [s["resps"][0][0] for s in samples] == [e["output"] for e in ours.examples]      # greedy generations
        assert [s["exact_match"] for s in samples] == [e["score"] for e in ours.examples], name
        prompts = [tok(e["prompt"], add_special_tokens=False)["input_ids"] for e in ours.examples]
        assert bool(shared_prefix(prompts)) == (name == "described_em")  # the cached-prefix path, where meant
        (mean,) = [v for k, v in summary.items() if k.startswith("exact_match,") and "stderr" not in k]
        assert mean == pytest.approx(ours.score)
    # the case-sensitive task misses the upper-cased answer that the case-insensitive one counts
    assert [e["score"] for e in evaluate(model, tok, ["plain_em"], n=6, tasks=parse_abilities(
        str(tmp_path / "plain_em.yaml"))[1])["plain_em"].examples][cased] == 0.0


MC = [("The sky on a clear day is", ["blue", "green", "loud", "square"], 0),
      ("Two plus two is", ["three", "four", "five", "a fish"], 1),
      ("Water freezes at zero degrees", ["Celsius", "Kelvin", "newtons", "meters"], 0),
      ("The opposite of up is", ["down", "left", "sideways", "purple"], 0),
      ("A week has seven", ["days", "hours", "apples", "rivers"], 0),
      ("Cats often chase", ["mice", "clouds", "numbers", "laws"], 0)]


def mc_yaml(folder, name, extra=""):
    """An lm-eval multiple_choice task over MC, written to ``folder``: ``mc.jsonl`` and ``NAME.yaml``."""
    (folder / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                             for q, c, a in MC))
    return lm_task(folder, name, "mc.jsonl", textwrap.dedent("""\
        output_type: multiple_choice
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_choice: choices
        doc_to_target: answer
        """) + textwrap.dedent(extra))


@pytest.mark.parametrize("shots", [0, 1])
def test_multiple_choice_tasks_give_lm_evals_choices_and_scores(sharp_dir, tmp_path, shots):
    sharp = sharp_dir  # sharpened weights, so the choices are not near ties
    mc_yaml(tmp_path, "mc_task", "metric_list:\n  - {metric: acc}\n  - {metric: acc_norm}\n")
    if shots:  # one solved example before each question: one record to draw, so both tools draw the same
        (tmp_path / "shot.jsonl").write_text(json.dumps({"question": "Birds can", "choices": ["rust", "fly"],
                                                         "answer": 1}) + "\n")
        text = (tmp_path / "mc_task.yaml").read_text().replace(
            "test_split: test", f"    train: {tmp_path / 'shot.jsonl'}\ntest_split: test")
        (tmp_path / "mc_task.yaml").write_text(text + "fewshot_split: train\nnum_fewshot: 1\n"
                                               "description: \"Pick the right ending.\\n\\n\"\n")
    names, tasks = parse_abilities(str(tmp_path / "mc_task.yaml"))
    model, tok = load_for_eval(sharp)
    ours = evaluate(model, tok, names, n=6, tasks=tasks)["mc_task"]
    samples, summary = lm_eval_samples(sharp, tmp_path, "mc_task")
    assert [s["arguments"][0][0] for s in samples] == [e["prompt"] for e in ours.examples]  # the same contexts
    if shots:
        assert ours.examples[0]["prompt"] == "Pick the right ending.\n\nQuestion: Birds can\nAnswer: fly\n\n" \
                                             "Question: The sky on a clear day is\nAnswer:"
    assert [s["acc"] for s in samples] == [e["acc"] for e in ours.examples]
    assert [s["acc_norm"] for s in samples] == [e["acc_norm"] for e in ours.examples]
    theirs = [[r[0] for r in s["filtered_resps"]] for s in samples]
    assert all(abs(a - b) < 1e-4 for t, e in zip(theirs, ours.examples) for a, b in zip(t, e["loglikelihoods"]))
    assert summary["acc,none"] == pytest.approx(ours.score)
    assert summary["acc_norm,none"] == pytest.approx(sum(e["acc_norm"] for e in ours.examples) / 6)


def test_loglikelihood_tasks_give_lm_evals_loglikelihoods_greedy_and_perplexity(tiny_dir, tmp_path):
    import math

    from mixtune.eval.lm_eval_results import lm_eval_results, lm_eval_sources

    model, tok = load_for_eval(tiny_dir)
    # targets: the model's own greedy next word for half the items, so acc is neither 0 nor 1
    prompts = [f"{w} {w} {w}:" for w in ("cat", "dog", "sun", "red", "cup", "map")]
    from mixtune.eval.choice import continuation_loglikelihoods, encode_pair

    words = []
    for text in prompts[::2]:  # a one-token continuation the model takes greedily, as lm-eval encodes it
        candidates = [t for t in (tok.decode([i]) for i in range(len(tok)))
                      if t.strip() and len(encode_pair(tok, text, t)[1]) == 1]
        found = continuation_loglikelihoods(model, tok, [(text, c) for c in candidates], batch_size=64)
        words += [next(c for c, (_, greedy) in zip(candidates, found) if greedy), None]
    rows = [{"text": p, "target": w if i % 2 == 0 else " zebra"} for i, (p, w) in enumerate(zip(prompts, words))]
    (tmp_path / "ll.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lm_task(tmp_path, "ll_task", "ll.jsonl", "output_type: loglikelihood\ndoc_to_text: text\ndoc_to_target: target\n")
    names, tasks = parse_abilities(str(tmp_path / "ll_task.yaml"))
    ours = evaluate(model, tok, names, n=6, tasks=tasks)["ll_task"]
    samples, summary = lm_eval_samples(tiny_dir, tmp_path, "ll_task")
    assert [tuple(s["arguments"][0]) for s in samples] == [(e["prompt"], e["target"]) for e in ours.examples]
    assert [s["acc"] for s in samples] == [e["score"] for e in ours.examples]
    assert all(abs(s["perplexity"] - e["loglikelihood"]) < 1e-4 for s, e in zip(samples, ours.examples))
    assert summary["acc,none"] == pytest.approx(ours.score) and 0 < ours.score < 1
    exported = lm_eval_results({"ll_task": ours}, model=model, tokenizer=tok, model_path=str(tiny_dir), n=6,
                               batch_size=4, tasks=tasks, sources=lm_eval_sources(str(tmp_path / "ll_task.yaml")),
                               started=0.0, seconds=1.0)["results"]["ll_task"]
    assert exported["perplexity,none"] == pytest.approx(summary["perplexity,none"], rel=1e-4)
    assert exported["perplexity,none"] == pytest.approx(math.exp(-sum(e["loglikelihood"] for e in ours.examples) / 6))
