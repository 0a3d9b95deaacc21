"""``general``: follow one of several word-level instructions, each phrased several ways.

Tasks: reverse the words, sort them, remove repeats, count them, put them in
capitals, join them with commas, look a key up in a list of ``key=value`` pairs.
Example (difficulty 1)::

    user:      Reverse the order of these words: sun cat red
               End your reply with "Answer: <the result>".
    assistant: Answer: red cat sun

The answer is stated directly. The structure key is the task and its words (the
phrasing is not part of it), so test problems never repeat a training input.
"""

from __future__ import annotations

import random

from mixtune.data.abilities.base import ABILITIES, Ability, Problem, same_text

DIFFICULTIES = {1: "3-4 words", 2: "4-6 words", 3: "6-8 words"}
_LENGTH = {1: (3, 4), 2: (4, 6), 3: (6, 8)}
_WORDS = ("sun cat red dog cup map box hat pen sky fox egg owl bee ant jam "
          "tea ice oak elm fig gem ink key").split()

_TASKS = {
    "reverse": (["Reverse the order of these words: {w}", "Write these words backwards, last word first: {w}",
                 "Say these words in reverse order: {w}"], lambda ws: " ".join(reversed(ws))),
    "sort": (["Sort these words alphabetically: {w}", "Put these words in alphabetical order: {w}",
              "Arrange in A-Z order: {w}"], lambda ws: " ".join(sorted(ws))),
    "dedupe": (["Remove repeated words, keeping the first of each: {w}",
                "List each word once, in order of first appearance: {w}"],
               lambda ws: " ".join(dict.fromkeys(ws))),
    "count": (["How many words are there in: {w}", "Count the words: {w}"], lambda ws: str(len(ws))),
    "upper": (["Write these words in capital letters: {w}", "Convert to upper case: {w}"],
              lambda ws: " ".join(ws).upper()),
    "commas": (["Join these words with commas: {w}", "Make a comma-separated list of: {w}"],
               lambda ws: ", ".join(ws)),
}


def make_problem(rng: random.Random, difficulty: int) -> Problem:
    lo, hi = _LENGTH[difficulty]
    task = rng.choice([*_TASKS, "lookup"])
    n = rng.randint(lo, hi)
    if task == "lookup":
        keys = rng.sample(_WORDS, n)
        values = [rng.randint(0, 9) for _ in keys]
        wanted = rng.randrange(n)
        pairs = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
        phrasing = rng.choice(["Given {p}. What is the value of {k}?", "In {p}, what is {k}?"])
        answer = str(values[wanted])
        return Problem(key=f"lookup|{pairs}|{keys[wanted]}", prompt=phrasing.format(p=pairs, k=keys[wanted]),
                       response=f"Answer: {answer}", answer=answer)
    if task == "dedupe":
        # draw from fewer distinct words so that repeats actually occur
        pool = rng.sample(_WORDS, max(2, n - 2))
        words = [rng.choice(pool) for _ in range(n)]
    else:
        words = rng.sample(_WORDS, n)
    phrasings, solve = _TASKS[task]
    answer = solve(words)
    return Problem(key=f"{task}|{' '.join(words)}", prompt=rng.choice(phrasings).format(w=" ".join(words)),
                   response=f"Answer: {answer}", answer=answer)


ABILITY = ABILITIES.add(
    "general",
    Ability(
        name="general",
        description="follow word-level instructions (reverse, sort, dedupe, count, capitals, commas, lookup)",
        make_problem=make_problem,
        match=same_text,
        difficulties=DIFFICULTIES,
        answer_format="<the result>",
        version=2,  # 2: the prompt states the answer format
    ),
)
