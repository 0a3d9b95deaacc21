"""``code``: trace a short generated Python program and state what it prints.

Example (difficulty 1)::

    user:      What does this program print?
               x = 3
               y = x + 4
               x = y - 2
               print(x)
               End your reply with "Answer: <what it prints>".
    assistant: x = 3
               y = 7
               x = 5
               Answer: 5

The chain of thought lists every assignment as it executes (a loop's body once
per iteration). The gold answer is computed while the program is generated; the
tests check it against what CPython prints for the same source. The structure
key is the program text itself.
"""

from __future__ import annotations

import random

from mixtune.data.abilities.base import ABILITIES, Ability, Problem, same_text

DIFFICULTIES = {
    1: "2-4 assignments with + and - on small integers, then print",
    2: "3-5 statements with + and -, a for-loop or string concatenation and len()",
    3: "4-6 statements with +, - and *, loops, string ops; operands up to 20",
}
_VARS = ["x", "y", "z", "a", "b"]
_WORDS = ["ab", "cd", "ox", "hi", "go", "up", "no", "red"]
_PROMPTS = ["What does this program print?", "What is the output of this Python code?",
            "Run this code in your head. What is printed?"]


def _numeric(rng: random.Random, difficulty: int) -> tuple[list[str], list[str], str]:
    top = 9 if difficulty < 3 else 20
    lo, hi = {1: (2, 4), 2: (3, 5), 3: (4, 6)}[difficulty]
    env: dict[str, int] = {}
    lines: list[str] = []
    trace: list[str] = []
    for _ in range(rng.randint(lo, hi)):
        var = rng.choice(_VARS[:3] if difficulty == 1 else _VARS)
        if not env or rng.random() < 0.2:
            value = rng.randint(0, top)
            lines.append(f"{var} = {value}")
            env[var] = value
            trace.append(f"{var} = {value}")
            continue
        left = rng.choice(sorted(env))
        if difficulty >= 2 and rng.random() < 0.3:
            # for-loop: the body adds or subtracts a constant k times
            k, n = rng.randint(2, 3), rng.randint(1, 5)
            op = "-" if env[left] - k * n >= 0 and rng.random() < 0.5 else "+"
            lines += [f"for i in range({k}):", f"    {left} = {left} {op} {n}"]
            for _ in range(k):
                env[left] = env[left] + n if op == "+" else env[left] - n
                trace.append(f"{left} = {env[left]}")
            continue
        use_var = len(env) > 1 and rng.random() < 0.4
        right_name = rng.choice(sorted(env)) if use_var else None
        right = env[right_name] if right_name else rng.randint(0, top if difficulty == 3 else 9)
        ops = "+-*" if difficulty == 3 else "+-"
        op = rng.choice(ops)
        if op == "*" and right > 5:
            op = "+"
        if op == "-" and env[left] - right < 0:
            op = "+"
        value = env[left] + right if op == "+" else env[left] - right if op == "-" else env[left] * right
        lines.append(f"{var} = {left} {op} {right_name or right}")
        env[var] = value
        trace.append(f"{var} = {value}")
    shown = rng.choice(sorted(env))
    lines.append(f"print({shown})")
    return lines, trace, str(env[shown])


def _string(rng: random.Random, difficulty: int) -> tuple[list[str], list[str], str]:
    s = rng.choice(_WORDS)
    lines, trace = [f's = "{s}"'], [f"s = {s}"]
    for _ in range(rng.randint(1, 2 if difficulty == 2 else 3)):
        if difficulty == 3 and rng.random() < 0.3:
            lines.append("s = s.upper()")
            s = s.upper()
        else:
            w = rng.choice(_WORDS)
            lines.append(f's = s + "{w}"')
            s = s + w
        trace.append(f"s = {s}")
    if rng.random() < 0.5:
        lines.append("print(len(s))")
        return lines, trace, str(len(s))
    lines.append("print(s)")
    return lines, trace, s


def make_problem(rng: random.Random, difficulty: int) -> Problem:
    use_string = difficulty >= 2 and rng.random() < 0.3
    lines, trace, answer = (_string if use_string else _numeric)(rng, difficulty)
    source = "\n".join(lines)
    return Problem(
        key=source,
        prompt=f"{rng.choice(_PROMPTS)}\n{source}",
        response="\n".join(trace) + f"\nAnswer: {answer}",
        answer=answer,
    )


ABILITY = ABILITIES.add(
    "code",
    Ability(
        name="code",
        description="trace a generated Python program and state what it prints",
        make_problem=make_problem,
        match=same_text,
        difficulties=DIFFICULTIES,
        answer_format="<what it prints>",
        version=2,  # 2: the prompt states the answer format
    ),
)
