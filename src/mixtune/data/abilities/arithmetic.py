"""``arithmetic``: one addition, subtraction or multiplication, stated and solved.

Example (difficulty 1)::

    user:      What is 23-7?
    assistant: 23-7=16. Answer: 16

Not held out (``held_out=False``): every fact may appear in both splits. It is a *knowledge*
corpus, the number facts a pretrained model brings to fine-tuning, and the built-in model
learns its other abilities far faster with these facts in its pretraining (measured for the
demo, README "Demo"). A score on it measures recall, not generalisation. The equations are
written as the maths chain of thought writes them (``23-7=16``); the structure key is the
equation.
"""

from __future__ import annotations

import random

from mixtune.data.abilities.base import ABILITIES, Ability, Problem, same_integer

DIFFICULTIES = {
    1: "a+b, a-b with a 0-40, b 0-9 (the facts maths and code level 1 use)",
    2: "a+b, a-b with a, b 0-99",
    3: "as level 2, plus axb with a 0-20, b 2-9",
}
_PROMPTS = ["What is {e}?", "Compute {e}.", "{e} = ?"]


def make_problem(rng: random.Random, difficulty: int) -> Problem:
    op = rng.choice("+-x" if difficulty == 3 else "+-")
    if op == "x":
        a, b = rng.randint(0, 20), rng.randint(2, 9)
        result = a * b
    else:
        a, b = (rng.randint(0, 40), rng.randint(0, 9)) if difficulty == 1 else (rng.randint(0, 99), rng.randint(0, 99))
        if op == "-" and b > a:
            a, b = b, a
        result = a + b if op == "+" else a - b
    equation = f"{a}{op}{b}"
    return Problem(key=equation, prompt=rng.choice(_PROMPTS).format(e=equation),
                   response=f"{equation}={result}. Answer: {result}", answer=str(result))


ABILITY = ABILITIES.add(
    "arithmetic",
    Ability(
        name="arithmetic",
        description="one +, - or x fact (pretraining knowledge; not held out)",
        make_problem=make_problem,
        match=same_integer,
        difficulties=DIFFICULTIES,
        held_out=False,
    ),
)
