"""Code with tests (HumanEval format) from a file: completions run in the sandbox, pass@1 and pass@k."""

import json
import shutil
import sys
import textwrap

import pytest

from mixtune.eval import evaluate, load_for_eval, parse_abilities

generate_module = sys.modules["mixtune.models.generate"]  # the module (mixtune.models.generate is also a function's name)
from mixtune.eval.passk import pass_at_k

PROBLEMS = [
    ("def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n", "def check(f):\n    assert f(2, 3) == 5\n", "add"),
    ("def neg(x):\n    \"\"\"Return -x.\"\"\"\n", "def check(f):\n    assert f(4) == -4\n", "neg"),
    ("def spin(n):\n    \"\"\"Return n.\"\"\"\n", "def check(f):\n    assert f(1) == 1\n", "spin"),
    ("def sq(x):\n    \"\"\"Return x * x.\"\"\"\n", "def check(f):\n    assert f(3) == 9\n", "sq"),
    ("def first(xs):\n    \"\"\"Return the first item.\"\"\"\n", "def check(f):\n    assert f([7, 8]) == 7\n", "first"),
]
# hand-written completions: correct, wrong, an infinite loop, a syntax error, one that tries to escape
COMPLETIONS = ["    return a + b\n", "    return x\n", "    while True:\n        pass\n", "    return x *\n",
               "    import os\n    os.system('touch /tmp/mixtune-pwned')\n    return xs[0]\n"]

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


@pytest.fixture()
def humaneval(tmp_path):
    (tmp_path / "he.jsonl").write_text("".join(json.dumps({"task_id": f"t/{i}", "prompt": p, "test": t, "entry_point": e})
                                               + "\n" for i, (p, t, e) in enumerate(PROBLEMS)))
    (tmp_path / "tasks.yaml").write_text(textwrap.dedent("""\
        tasks:
          he:
            kind: code
            path: he.jsonl
            cpu_seconds: 1
          he_k:
            kind: code
            path: he.jsonl
            samples: 3
            k: [1, 2]
        """))
    return tmp_path / "tasks.yaml"


@needs_bwrap
def test_greedy_completions_run_against_their_tests(humaneval, tiny_dir, monkeypatch):
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kw):
        seen["prompts"], seen["stop"] = list(prompts), kw["stop"]
        return COMPLETIONS

    monkeypatch.setattr(generate_module, "generate", fake_generate)
    model, tok = load_for_eval(tiny_dir)
    names, tasks = parse_abilities(str(humaneval))
    sc = evaluate(model, tok, ["he"], n=5, tasks=tasks)["he"]
    assert seen["prompts"] == [p for p, _, _ in PROBLEMS] and "\ndef" in seen["stop"]  # prompts as they are
    assert [e["passed"] for e in sc.examples] == [[True], [False], [False], [False], [False]]
    assert sc.score == 0.2 and sc.n == 5
    from pathlib import Path

    assert not Path("/tmp/mixtune-pwned").exists()  # process creation is refused


@needs_bwrap
def test_sampled_completions_give_pass_at_k(humaneval, tiny_dir, monkeypatch):
    samples = {p: s for (p, _, _), s in zip(PROBLEMS, [
        ["    return a + b\n", "    return a - b\n", "    return b + a\n"],  # 2 of 3 pass
        ["    return x\n"] * 3,                                               # 0 of 3
        ["    return n\n", "    return 0\n", "    return 0\n"],              # 1 of 3
        ["    return x * x\n"] * 3,                                          # 3 of 3
        ["    return xs[1]\n"] * 3])}                                        # 0 of 3

    def fake_sample(model, tokenizer, prompts, *, num_samples, **kw):
        assert num_samples == 3 and kw["seed"] == 0 and kw["temperature"] == 0.8
        return [samples[p] for p in prompts]

    monkeypatch.setattr(generate_module, "sample", fake_sample)
    model, tok = load_for_eval(tiny_dir)
    _, tasks = parse_abilities(str(humaneval))
    sc = evaluate(model, tok, ["he_k"], n=5, tasks=tasks)["he_k"]
    counts = [(3, 2), (3, 0), (3, 1), (3, 3), (3, 0)]
    # pass@1 = c/n per problem; pass@2 = 1 - C(n-c, 2)/C(n, 2)
    assert sc.score == pytest.approx(sum(c / n for n, c in counts) / 5)
    assert [e["pass@2"] for e in sc.examples] == pytest.approx([1.0, 0.0, 2 / 3, 1.0, 0.0])
    assert [e["pass@2"] for e in sc.examples] == pytest.approx([pass_at_k(n, c, 2) for n, c in counts])


def test_k_above_samples_is_refused(humaneval, tiny_dir):
    from mixtune.core import ConfigError

    text = humaneval.read_text().replace("k: [1, 2]", "k: [1, 5]")
    humaneval.write_text(text)
    model, tok = load_for_eval(tiny_dir)
    _, tasks = parse_abilities(str(humaneval))
    with pytest.raises(ConfigError, match=r"pass@5 needs samples >= 5 \(samples = 3\)"):
        evaluate(model, tok, ["he_k"], n=2, tasks=tasks)
