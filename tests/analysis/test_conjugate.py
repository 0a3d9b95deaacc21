"""Conjugate prompting (Kotha et al., 2024): the built-in transforms on hand-written prompts, user
transforms, and evaluation under a transform on the same problems as the plain one."""

import json
import sys
import textwrap

import pytest

from mixtune.analysis import TRANSFORMS, conjugate_scores, get_transform
from mixtune.analysis.conjugate import applies, frame, no_format, split_instruction, words
from mixtune.core import ConfigError, UnknownNameError
from mixtune.data.abilities import ABILITIES
from mixtune.eval import evaluate, load_for_eval, parse_abilities
from mixtune.eval.tasks import ChoiceTask, load_items, render_prompts, run_task

pytestmark = pytest.mark.usefixtures("one_thread")

LINE = 'End your reply with "Answer: <number>".'
MATH = f"Max has 5 stickers. He loses 4. Then he gets 1 more. How many stickers does Max have now?\n{LINE}"


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_for_eval(tiny_dir)


def test_each_builtin_transform_on_a_hand_written_prompt():
    assert frame(MATH) == ("Reply to this:\nMax has 5 stickers. He loses 4. Then he gets 1 more. How many stickers "
                           f"does Max have now?\n\n{LINE}")
    assert words(MATH) == ("Max has five stickers. He loses four. Then he gets one more. How many stickers does Max "
                           f"have now?\n{LINE}")
    assert no_format(MATH) == ("Max has 5 stickers. He loses 4. Then he gets 1 more. How many stickers does Max "
                               "have now?")
    code = 'What does this program print?\nx = 3\nprint(x)\nEnd your reply with "Answer: <what it prints>".'
    assert frame(code) == ('Reply to this:\nWhat does this program print?\nx = 3\nprint(x)\n\n'
                           'End your reply with "Answer: <what it prints>".')
    assert no_format(code) == "What does this program print?\nx = 3\nprint(x)"
    # no instruction line (arithmetic, echo): frame adds only the header, no_format changes nothing
    assert frame("3-1 = ?") == "Reply to this:\n3-1 = ?" and no_format("3-1 = ?") == "3-1 = ?"
    # an instruction line only counts as the last line and in the suite's exact wording
    assert split_instruction(f"{LINE}\nHow many?") == (f"{LINE}\nHow many?", "")
    loose = "How many?\nEnd your reply with Answer: 3."
    assert split_instruction(loose) == (loose, "")


def test_words_converts_only_standalone_integers_up_to_twenty():
    assert words("Mia has 1 coin. She finds 0 more. It grows 2 times.") == \
        "Mia has one coin. She finds zero more. It grows two times."  # singular left as written
    assert words("He has 20 pens, then 21, then 100.") == "He has twenty pens, then 21, then 100."
    assert words("(3) 13 19 is 7.") == "(three) thirteen nineteen is seven."
    # inside a word or part of a longer numeral: left alone
    assert words("x2 2x a_1 3.5 1,200 2-4 -3 3+4 1/2 10:30 07") == "x2 2x a_1 3.5 1,200 2-4 -3 3+4 1/2 10:30 07"
    # numbers in the instruction line are never touched
    assert words('Take 3.\nEnd your reply with "Answer: <a number from 1 to 20>".') == \
        'Take three.\nEnd your reply with "Answer: <a number from 1 to 20>".'


def test_the_registry_says_which_abilities_each_transform_applies_to(tokenizer):
    assert TRANSFORMS.names() == ["frame", "words", "no_format"]
    assert sorted(TRANSFORMS.get("frame").abilities) == sorted(ABILITIES)
    assert TRANSFORMS.get("words").abilities == ("math",)
    # no_format applies exactly where there is an instruction line to remove
    with_line = sorted(a for a in ABILITIES if ABILITIES.get(a).answer_format)
    assert sorted(TRANSFORMS.get("no_format").abilities) == with_line == ["code", "general", "math"]
    assert TRANSFORMS.get("words")(MATH) == words(MATH)
    # the header is made of the suite's words: nine tokens (Re pl y _ t o _this : newline), none unknown,
    # decoding back to itself; and no training prompt contains it
    ids = tokenizer("Reply to this:\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) < 10 and tokenizer.decode(ids) == "Reply to this:\n"
    assert not any("Reply to this" in r["messages"][0]["content"]
                   for a in ABILITIES for r in ABILITIES.get(a).generate(200, split="train", difficulty=2))


@pytest.mark.parametrize("name", ["frame", "words", "no_format"])
def test_a_transform_rewords_only_the_user_text_of_the_same_problems(name):
    fn = get_transform(name)
    for ability in TRANSFORMS.get(name).abilities:
        for level in (1, 3):
            plain = ABILITIES.get(ability).generate(40, seed=0, split="test", difficulty=level)
            for r in plain:
                question = r["messages"][0]["content"]
                new = fn(question)
                assert new != question or (name == "words" and not any(c.isdigit() for c in question))
                if name == "frame":  # nothing of the question is lost
                    assert new.replace("Reply to this:\n", "", 1).replace("\n\nEnd your", "\nEnd your") == question
                if name == "no_format":
                    assert question == f"{new}\n{ABILITIES.get(ability).instruction}"


def test_get_transform_reads_templates_and_python_specs(tmp_path, monkeypatch):
    t = get_transform("Translate, then answer:\n{prompt}")
    assert t("What is 2+3?") == "Translate, then answer:\nWhat is 2+3?"
    assert get_transform("{{note}} {prompt} / {prompt}")("a{b}") == "{note} a{b} / a{b}"  # braces in the prompt stay
    (tmp_path / "my_prompts.py").write_text("def shout(text):\n    return text.upper()\n\nNOT_A_FN = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_transform("python:my_prompts:shout")("ab") == "AB"
    bad = {
        "Q: {question}": "transform template 'Q: {question}' names {question}; the only field is {prompt}",
        "Q: {}": "names {}; the only field is {prompt}",
        "Q: {prompt!r}": "write {prompt} without a conversion or format spec",
        "Q: {{prompt}}": "has no {prompt} field",
        "Q: {prompt": "transform template 'Q: {prompt': expected '}' before end of string; write a literal brace",
        "python:my_prompts": "transform 'python:my_prompts': expected python:module:function",
        "python:no_such_module_xyz:f": "transform 'python:no_such_module_xyz:f': cannot import it (ModuleNotFoundError",
        "python:my_prompts:missing": "cannot import it (AttributeError",
        "python:my_prompts:NOT_A_FN": "transform 'python:my_prompts:NOT_A_FN': my_prompts.NOT_A_FN is a int, not a",
    }
    for spec, message in bad.items():
        with pytest.raises(ConfigError) as e:
            get_transform(spec)
        assert message in str(e.value) and "\n" not in str(e.value), spec
    with pytest.raises(UnknownNameError, match=r"unknown prompt transform 'fram'\. Did you mean: frame\?.*python:"):
        get_transform("fram")
    sys.modules.pop("my_prompts", None)


def test_evaluate_without_a_transform_is_unchanged_and_with_one_shows_the_new_prompt(loaded):
    model, tok = loaded
    plain = evaluate(model, tok, ["math"], n=4)["math"]
    records = ABILITIES.get("math").generate(4, seed=0, split="test")
    assert [e["prompt"] for e in plain.examples] == [r["messages"][0]["content"] for r in records]
    assert [e["answer"] for e in plain.examples] == [r["answer"] for r in records]
    # None and the identity give the very same examples: the transform path alters nothing else
    assert evaluate(model, tok, ["math"], n=4, transform=None)["math"].examples == plain.examples
    assert evaluate(model, tok, ["math"], n=4, transform=lambda s: s)["math"].examples == plain.examples
    framed = evaluate(model, tok, ["math"], n=4, transform=frame)["math"]
    assert [e["prompt"] for e in framed.examples] == [frame(e["prompt"]) for e in plain.examples]
    assert [e["answer"] for e in framed.examples] == [e["answer"] for e in plain.examples]
    assert framed.n == plain.n == 4 and framed.version == plain.version


def test_conjugate_scores_are_on_the_plain_problems_and_skip_what_does_not_apply(loaded):
    model, tok = loaded
    plain = evaluate(model, tok, ["math", "code"], n=3, seed=2, difficulty=2)
    got = conjugate_scores(model, tok, ["math", "code"], ["words", "no_format", "Now: {prompt}"], n=3, seed=2,
                           difficulty=2)
    assert list(got) == ["words", "no_format", "Now: {prompt}"]
    assert list(got["words"]) == ["math"]  # words would change the program: code is left out
    assert list(got["no_format"]) == list(got["Now: {prompt}"]) == ["math", "code"]
    for spec, scores in got.items():
        fn = get_transform(spec)
        for ability, sc in scores.items():
            base = plain[ability].examples
            assert [e["answer"] for e in sc.examples] == [e["answer"] for e in base]
            assert [e["prompt"] for e in sc.examples] == [fn(e["prompt"]) for e in base]
    assert conjugate_scores(model, tok, ["code"], ["words"], n=3) == {"words": {}}
    with pytest.raises(UnknownNameError, match="unknown ability 'maths'"):
        conjugate_scores(model, tok, ["maths"], ["words"], n=3)  # checked even where words would skip it
    with pytest.raises(ConfigError, match="names {x}"):
        conjugate_scores(model, tok, ["math"], ["frame", "{x}"], n=3)


@pytest.fixture()
def qa_task(tmp_path):
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                               for q, a in [("Tom has 3 apples.", "3"), ("Zoe has 2 pens.", "2")]))
    (tmp_path / "shots.jsonl").write_text(json.dumps({"question": "Ana has 1 cup.", "answer": "1"}) + "\n")
    (tmp_path / "tasks.yaml").write_text(textwrap.dedent("""\
        tasks:
          qa:
            path: qa.jsonl
            prompt: "Q: {question}"
            max_new_tokens: 4
            fewshot: 1
            fewshot_path: shots.jsonl
            format: plain
        """))
    return parse_abilities(str(tmp_path / "tasks.yaml"))[1]


def test_a_template_transform_rewords_a_generate_tasks_question_not_its_examples(qa_task, loaded):
    model, tok = loaded
    fn = get_transform("In words: {prompt}")
    task = qa_task["qa"]
    assert render_prompts(task, load_items(task), tok, fn) == ["Q: Ana has 1 cup. 1\n\nIn words: Q: Tom has 3 apples.",
                                                              "Q: Ana has 1 cup. 1\n\nIn words: Q: Zoe has 2 pens."]
    assert render_prompts(task, load_items(task), tok) == ["Q: Ana has 1 cup. 1\n\nQ: Tom has 3 apples.",
                                                          "Q: Ana has 1 cup. 1\n\nQ: Zoe has 2 pens."]
    sc = evaluate(model, tok, ["qa"], n=2, tasks=qa_task, transform=fn)["qa"]
    assert [e["prompt"] for e in sc.examples] == render_prompts(task, load_items(task), tok, fn)
    assert [e["answer"] for e in sc.examples] == [["3"], ["2"]]
    got = conjugate_scores(model, tok, ["qa"], ["frame", "In words: {prompt}"], tasks=qa_task, n=2)
    assert got["frame"] == {} and got["In words: {prompt}"]["qa"].examples == sc.examples


def test_only_generate_tasks_and_builtin_abilities_take_a_transform(qa_task, tmp_path, loaded):
    model, tok = loaded
    mc = ChoiceTask(path=tmp_path / "qa.jsonl", prompt="{question}", choices="question", gold="answer")
    tasks = dict(qa_task) | {"mc": mc}
    assert applies("Q {prompt}", "qa", tasks) and not applies("Q {prompt}", "mc", tasks)
    assert not applies("frame", "qa", tasks) and applies("frame", "echo") and not applies("words", "general")
    assert applies("python:m:f", "code")
    with pytest.raises(ConfigError, match="^task mc: a prompt transform applies to generate tasks and built-in "
                                          "abilities, not to a multiple_choice task$"):
        run_task("mc", mc, model, tok, n=1, batch_size=1, transform=frame)
