"""``echo``: repeat a string of words, numbers and symbols exactly.

Example (difficulty 1)::

    user:      Repeat exactly: fox 7 = x + Mia
    assistant: Answer: fox 7 = x + Mia

Not an ability to measure so much as generic *format pretraining*: a model from random
initialisation that first learns to copy text over the suite's whole vocabulary, in the
``Answer:`` format, later learns a new ability even after a specialist stage (shared/NOTES.md:
general accuracy 0.11-0.13 without it, 0.66 with it, on the prototype). The structure key is the
string itself.
"""

from __future__ import annotations

import random

from mixtune.data.abilities.base import ABILITIES, Ability, Problem, same_text

DIFFICULTIES = {1: "3-6 pieces", 2: "6-10 pieces", 3: "10-16 pieces"}
_LENGTH = {1: (3, 6), 2: (6, 10), 3: (10, 16)}
_PIECES = ("sun cat red dog cup map box hat pen sky fox egg owl bee ant jam tea ice oak elm fig gem ink key "
           "Mia Tom Ana Leo Zoe Sam Ivy Max apples coins marbles stickers books pens shells cards "
           "x y z a b s print for in range len upper if ( ) [ ] { } : , . ? ! = + - * / ' \" "
           "0 1 2 3 4 5 6 7 8 9 10 25 100").split()
_PROMPTS = ["Repeat exactly: {t}", "Copy this text: {t}", "Say back: {t}"]


def make_problem(rng: random.Random, difficulty: int) -> Problem:
    text = " ".join(rng.choice(_PIECES) for _ in range(rng.randint(*_LENGTH[difficulty])))
    return Problem(key=text, prompt=rng.choice(_PROMPTS).format(t=text), response=f"Answer: {text}", answer=text)


ABILITY = ABILITIES.add(
    "echo",
    Ability(
        name="echo",
        description="repeat a string exactly (format pretraining for models from scratch)",
        make_problem=make_problem,
        match=same_text,
        difficulties=DIFFICULTIES,
    ),
)
