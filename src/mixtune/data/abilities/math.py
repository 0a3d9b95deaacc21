"""``math``: multi-step arithmetic word problems with a short chain of thought.

Example (difficulty 1)::

    user:      Mia has 2 coins. She finds 8 more. Then she gives away 4. How many coins does Mia have now?
               End your reply with "Answer: <number>".
    assistant: 2+8=10. 10-4=6. Answer: 6

The chain of thought writes one equation per step in the order of the story.
Quantities never go below zero. The structure key is the start value and the
list of (operation, operand), so a test problem never shares its numbers and
operations with a training problem, whatever the names and wording.
"""

from __future__ import annotations

import random

from mixtune.data.abilities.base import ABILITIES, Ability, Problem, same_integer

DIFFICULTIES = {
    1: "1-3 steps of + and -, operands 0-9",
    2: "2-4 steps of + and -, operands 1-20",
    3: "2-4 steps of +, - and x (x2..x5), operands 1-20",
}
_STEPS = {1: (1, 3), 2: (2, 4), 3: (2, 4)}
_OPERAND = {1: (0, 9), 2: (1, 20), 3: (1, 20)}

_NAMES = [("Mia", "She", "her"), ("Tom", "He", "his"), ("Ana", "She", "her"), ("Leo", "He", "his"),
          ("Zoe", "She", "her"), ("Sam", "He", "his"), ("Ivy", "She", "her"), ("Max", "He", "his")]
_ITEMS = ["apples", "coins", "marbles", "stickers", "books", "pens", "shells", "cards"]
_ADD = ["{he} finds {n} more.", "{he} buys {n} more.", "{he} gets {n} more.", "A friend gives {him} {n} more."]
_SUB = ["{he} gives away {n}.", "{he} loses {n}.", "{he} sells {n}.", "{he} uses {n}."]
_MUL = ["{he} ends up with {n} times as many.", "The number of {items} grows {n} times."]


def make_problem(rng: random.Random, difficulty: int) -> Problem:
    name, he, his = rng.choice(_NAMES)
    items = rng.choice(_ITEMS)
    lo, hi = _OPERAND[difficulty]
    value = rng.randint(lo, hi)
    start = value
    sentences = [f"{name} has {value} {items[:-1] if value == 1 else items}."]
    steps, ops = [], []
    for i in range(rng.randint(*_STEPS[difficulty])):
        op = rng.choice("+-*" if difficulty == 3 else "+-")
        if op == "-" and value == 0:
            op = "+"
        if op == "+":
            n = rng.randint(lo, hi)
            template, new = rng.choice(_ADD), value + n
        elif op == "-":
            n = rng.randint(min(lo, value), min(hi, value))
            template, new = rng.choice(_SUB), value - n
        else:
            n = rng.randint(2, 5)
            template, new = rng.choice(_MUL), value * n
        sentence = template.format(he=he, him="him" if he == "He" else "her", n=n, items=items)
        sentences.append(("Then " + sentence[0].lower() + sentence[1:]) if i else sentence)
        steps.append(f"{value}{'x' if op == '*' else op}{n}={new}.")
        ops.append(f"{op}{n}")
        value = new
    sentences.append(f"How many {items} does {name} have now?")
    return Problem(
        key=f"{start}" + "".join(ops),
        prompt=" ".join(sentences),
        response=" ".join(steps) + f" Answer: {value}",
        answer=str(value),
    )


ABILITY = ABILITIES.add(
    "math",
    Ability(
        name="math",
        description="multi-step arithmetic word problems, chain of thought, integer answer",
        make_problem=make_problem,
        match=same_integer,
        difficulties=DIFFICULTIES,
        answer_format="<number>",
        version=2,  # 2: the prompt states the answer format
    ),
)
