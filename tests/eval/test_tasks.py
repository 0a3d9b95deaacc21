"""Abilities from the user's files: a GSM8K-style JSONL and its task YAML, prompts, scores, errors."""

import json
import sys
import textwrap

import pytest

from mixtune.core import ConfigError, DataError
from mixtune.eval import evaluate, load_for_eval, parse_abilities
from mixtune.eval.tasks import GenerateTask, fingerprint, load_items, load_tasks, render_prompts, score_output

QUESTIONS = [("Tom has 3 apples and buys 4. How many?", "Tom has 3 + 4 = 7.\n#### 7"),
             ("A box holds 12 eggs; 5 break. How many are left?", "12 - 5 = 7.\n#### 7"),
             ("Sam reads 10 pages a day for 3 days. Pages?", "10 * 3 = 30.\n#### 30"),
             ("There are 1,200 seats and 200 are taken. Free?", "1200 - 200 = 1000.\n#### 1,000")]


@pytest.fixture()
def gsm(tmp_path):
    test = tmp_path / "gsm_test.jsonl"
    test.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    train = tmp_path / "gsm_train.jsonl"
    train.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}.\n#### {i + 1}"})
                             + "\n" for i in range(10)))
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(textwrap.dedent("""\
        tasks:
          gsm:
            path: gsm_test.jsonl
            prompt: "Question: {question}\\nAnswer:"
            references: answer
            scorer: numeric
            scorer_options: {extract: last_number}
            max_new_tokens: 8
            fewshot: 2
            fewshot_path: gsm_train.jsonl
            format: plain
        """))
    return tasks


def test_a_task_file_loads_with_paths_from_its_folder(gsm):
    tasks = load_tasks(gsm)
    task = tasks["gsm"]
    assert task.path == gsm.parent / "gsm_test.jsonl" and task.scorer == "numeric" and task.fewshot == 2
    assert [w for w, _ in load_items(task, 2)] == [f"{task.path}:1", f"{task.path}:2"]  # the first n, in order


def test_plain_prompts_put_seeded_fewshot_examples_first(gsm, tokenizer):
    task = load_tasks(gsm)["gsm"]
    prompts = render_prompts(task, load_items(task, 2), tokenizer)
    blocks = prompts[0].split("\n\n")
    # two examples (prompt, a space, the target), then the question; the same examples for every item
    assert len(blocks) == 3 + blocks[0].count("\n\n")
    assert prompts[0].endswith("Question: Tom has 3 apples and buys 4. How many?\nAnswer:")
    assert prompts[0].split("Question: Tom")[0] == prompts[1].split("Question: A box")[0]
    assert prompts[0].startswith("Question: What is ") and "#### " in prompts[0]
    again = render_prompts(task.model_copy(update={"seed": 0}), load_items(task, 1), tokenizer)
    other = render_prompts(task.model_copy(update={"seed": 5}), load_items(task, 1), tokenizer)
    assert again[0] == prompts[0] and other[0] != prompts[0]


def test_chat_prompts_use_the_template_with_examples_as_turns(gsm, tokenizer):
    task = load_tasks(gsm)["gsm"].model_copy(update={"format": "chat", "system": "Be brief."})
    (prompt,) = render_prompts(task, load_items(task, 1), tokenizer)
    assert prompt.count("Question: What is") == 2 and "Be brief." in prompt
    assert prompt.rstrip().endswith(tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True).split("x")[-1].rstrip())


def test_scores_follow_the_scorer(gsm):
    task = load_tasks(gsm)["gsm"]
    items = load_items(task)
    assert [score_output(task, out, r, w) for out, (w, r) in zip(["7", "so 7.", "31", "1000"], items)] == \
        [1.0, 1.0, 0.0, 1.0]


def test_evaluate_runs_a_file_task_beside_a_builtin(gsm, tiny_dir):
    model, tok = load_for_eval(tiny_dir)
    names, tasks = parse_abilities(f"math,{gsm}")
    assert names == ["math", "gsm"]
    scores = evaluate(model, tok, names, n=3, tasks=tasks)
    sc = scores["gsm"]
    assert sc.n == 3 and len(sc.examples) == 3 and sc.version == 1
    task = tasks["gsm"]
    items = load_items(task, 3)
    # the score is the mean of the item scores of exactly the outputs it reports
    assert sc.score == sum(score_output(task, e["output"], r, w) for e, (w, r) in zip(sc.examples, items)) / 3
    assert scores["math"].n == 3


def test_a_user_scorer_by_dotted_path(gsm, tiny_dir, tmp_path, monkeypatch):
    (tmp_path / "my_scorer.py").write_text("def always(output, record):\n    return 1.0 if 'question' in record else 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = gsm.read_text().replace("scorer: numeric", "scorer: my_scorer:always")
    gsm.write_text(text)
    model, tok = load_for_eval(tiny_dir)
    names, tasks = parse_abilities(str(gsm))
    assert evaluate(model, tok, names, n=2, tasks=tasks)["gsm"].score == 1.0
    sys.modules.pop("my_scorer", None)


def test_mistakes_are_reported_with_their_line(gsm, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  gsm:\n    path: missing.jsonl\n    scorer: exakt\n  math:\n    path: gsm_test.jsonl\n")
    with pytest.raises(ConfigError) as e:
        load_tasks(bad)
    msg = str(e.value)
    assert f"{bad}:3 tasks.gsm.generate.path" in msg or f"{bad}:3 tasks.gsm.path" in msg
    assert "no such file or folder" in msg and "unknown scorer 'exakt'" in msg
    bad.write_text("tasks:\n  math:\n    path: gsm_test.jsonl\n")
    with pytest.raises(ConfigError, match="task names math are built-in abilities"):
        load_tasks(bad)


def test_a_record_without_the_fields_names_its_line(gsm, tokenizer):
    task = load_tasks(gsm)["gsm"]
    broken = task.model_copy(update={"prompt": "{query}", "fewshot": 0})
    with pytest.raises(DataError, match=r"gsm_test.jsonl:1: the prompt template names field 'query'"):
        render_prompts(broken, load_items(task, 1), tokenizer)
    with pytest.raises(DataError, match=r"gsm_test.jsonl:1: no field 'solution'"):
        score_output(task.model_copy(update={"references": "solution"}), "7", *reversed(load_items(task, 1)[0]))


def test_the_fingerprint_follows_settings_and_data(gsm):
    task = load_tasks(gsm)["gsm"]
    before = fingerprint(task)
    assert fingerprint(task.model_copy(update={"max_new_tokens": 9})) != before
    with open(task.path, "a") as f:
        f.write(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    assert fingerprint(task) != before


def test_the_cli_scores_a_task_file(gsm, tiny_dir, capsys, monkeypatch):
    from mixtune.cli import main

    monkeypatch.setattr(sys, "argv", ["mixtune", "eval", str(tiny_dir), "--abilities", f"math,{gsm}", "--n", "2"])
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == ["math", "gsm"]
    assert all(r.split("│")[-2].strip() == "2" for r in rows)  # n per ability


def test_multiple_choice_items_take_an_index_a_letter_or_the_text(tmp_path, tiny_dir):
    from mixtune.eval.tasks import ChoiceTask, choice_item

    task = ChoiceTask(path=tmp_path, prompt="Q: {q}\nA:", choices="opts", gold="gold")
    rec = {"q": "2+2?", "opts": ["3", "4", "5"]}
    assert choice_item(task, rec | {"gold": 1}, "f:1").gold == 1
    assert choice_item(task, rec | {"gold": "B"}, "f:1").gold == 1
    assert choice_item(task, rec | {"gold": "2"}, "f:1").gold == 2  # a digit string is an index
    item = choice_item(task, rec | {"gold": 0}, "f:1")
    assert item.context == "Q: 2+2?\nA:" and list(item.choices) == ["3", "4", "5"]
    with pytest.raises(DataError, match=r"f:1: gold 7 is outside the 3 choices"):
        choice_item(task, rec | {"gold": 7}, "f:1")
    with pytest.raises(DataError, match=r"f:1: gold 'seven' is neither an index, a letter nor one of the choices"):
        choice_item(task, rec | {"gold": "seven"}, "f:1")
    (tmp_path / "mc.jsonl").write_text(json.dumps(rec | {"gold": "B"}) + "\n")
    (tmp_path / "t.yaml").write_text("tasks:\n  mc:\n    kind: multiple_choice\n    path: mc.jsonl\n"
                                     "    prompt: 'Q: {q}\\nA:'\n    choices: opts\n    gold: gold\n    metric: acc_norm\n")
    model, tok = load_for_eval(tiny_dir)
    names, tasks = parse_abilities(str(tmp_path / "t.yaml"))
    sc = evaluate(model, tok, names, n=5, tasks=tasks)["mc"]
    (e,) = sc.examples
    assert sc.n == 1 and sc.score == e["acc_norm"] == float(e["pred_norm"] == 1)


def test_multiple_choice_fewshot_examples_show_their_gold_choice(tmp_path):
    import random

    from mixtune.eval.tasks import ChoiceTask, choice_item, choice_shots

    shots = [{"q": f"{i}+1?", "opts": [str(i), str(i + 1)], "gold": "B"} for i in range(5)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shots))
    task = ChoiceTask(path=tmp_path, prompt="Q: {q}\nA:", choices="opts", gold="gold", fewshot=2,
                      fewshot_path=tmp_path / "train.jsonl", seed=3, preamble="Pick one.\n\n")
    picked = random.Random(3).sample(shots, 2)  # the draw of generate tasks, with the task's seed
    expected = "".join(f"Q: {r['q']}\nA: {int(r['q'].split('+')[0]) + 1}\n\n" for r in picked)
    assert choice_shots(task) == expected
    item = choice_item(task, {"q": "2+2?", "opts": ["3", "4"], "gold": 1}, "f:1", shots=choice_shots(task))
    assert item.context == "Pick one.\n\n" + expected + "Q: 2+2?\nA:"
    with pytest.raises(ConfigError, match="fewshot > 0 needs fewshot_path"):
        choice_shots(task.model_copy(update={"fewshot_path": None}))
