"""Conjugate prompting: score an ability under a reworded prompt that later fine-tuning never saw
(Kotha, Springer & Raghunathan, 2024, "Understanding Catastrophic Forgetting in Language Models via
Implicit Inference", ICLR, arXiv:2309.10105).

Fine-tuning teaches a model to infer the fine-tuning task for prompts near its distribution; an
ability it seems to forget may only be suppressed. The paper moves the prompt away from that
distribution (it translates it into another language) and scores the ability again: accuracy that
returns under the conjugate prompt was suppressed, not erased. Here the conjugate prompts are the
very problems of the plain evaluation, only reworded: the same records, in the same order, with the
same gold answers (:func:`conjugate_scores` with the plain evaluation's ``n``, ``seed``, ``difficulty``).

**Built-in transforms** (:data:`TRANSFORMS`). Each is a pure function ``str -> str`` on the text of
a built-in record's user message. That text ends with the answer-format line
``End your reply with "Answer: <...>".`` for ``math``, ``code`` and ``general``; ``arithmetic`` and
``echo`` have none. The *instruction line* below is that last line when it is one, else nothing.

- ``frame`` (every built-in ability): the question under the header line ``Reply to this:``, then a
  blank line before the instruction line; question and instruction are left as they are. No
  built-in prompt uses this frame, and its words are the suite's own (``reply``, ``to``, ``this``):
  the built-in tokenizer encodes the header line in nine tokens, none unknown::

      Mia has 3 marbles. She buys 0 more. How many marbles does Mia have now?
      End your reply with "Answer: <number>".
  ->
      Reply to this:
      Mia has 3 marbles. She buys 0 more. How many marbles does Mia have now?

      End your reply with "Answer: <number>".

  (without an instruction line: ``Reply to this:\\n3-1 = ?``).
- ``words`` (``math``): every standalone integer 0-20 of the question written as an English word,
  lower case (``zero`` ... ``twenty``); the instruction line is left alone::

      Max has 5 stickers. He loses 4. Then he gets 1 more. How many stickers does Max have now?
      End your reply with "Answer: <number>".
  ->
      Max has five stickers. He loses four. Then he gets one more. How many stickers does Max have now?
      End your reply with "Answer: <number>".

  An integer is standalone when it is a whole run of digits with no letter, digit or ``_`` on either
  side and not joined to another number: not right after one of ``. , : / + -``, not right before
  one of ``, : / + -``, nor before a ``.`` followed by a digit (a sentence's full stop is fine). So
  ``x2``, ``2x``, ``3.5``, ``1,200``, ``2-4`` and ``-3`` stay as they are, and so do integers above 20
  and numbers with a leading zero (``07``). Nothing else changes: the maths prompts already write
  ``1 coin`` in the singular, which becomes ``one coin``; a number opening a sentence stays lower
  case. Not for ``code`` (it would change the program),
  ``arithmetic`` (an equation, not prose) or ``general`` (its only numbers are the values of its
  ``key=value`` look-ups: data, not prose).
- ``no_format`` (``code``, ``general``, ``math``: the abilities with an instruction line): the
  instruction line and the line break before it removed (``...have now?``). The model must still
  end its reply with ``Answer: ...`` to score, which is what this measures. A text without an
  instruction line is returned unchanged.

**User transforms** (:func:`get_transform`): a template such as ``"Translate, then answer:\\n{prompt}"``
(``str.format`` with the single field ``{prompt}``, which may appear more than once; ``{{`` and
``}}`` write literal braces, as in a task file's ``prompt``), or ``python:module:function``, a
function ``str -> str`` imported by name. A user transform rewrites the whole user message of a
built-in ability (instruction line included) and the filled question of a generate task
(:func:`mixtune.eval.tasks.render_prompts`; not its few-shot examples).

**Which abilities a transform applies to.** A built-in transform applies to the built-in
abilities it lists (:attr:`Transform.abilities`); a user transform to every built-in ability and to
the generate tasks of task files. :func:`conjugate_scores` leaves the other (transform, ability)
pairs out of its result (``words`` scores no ``code``): they are reported as not applicable, not
as an error. Code, multiple-choice and log-likelihood tasks take no transform (their prompt is a
program to complete or a context whose likelihood is the score).
"""

from __future__ import annotations

import importlib
import logging
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mixtune.core import ConfigError, Registry, UnknownNameError
from mixtune.data.abilities import ABILITIES
from mixtune.data.abilities.base import ANSWER_INSTRUCTION
from mixtune.eval.run import AbilityScore, evaluate
from mixtune.eval.tasks import GenerateTask

log = logging.getLogger(__name__)

_BEFORE, _AFTER = ANSWER_INSTRUCTION.split("{}")
_INSTRUCTION = re.compile(re.escape(_BEFORE) + r"[^\n]*" + re.escape(_AFTER))
FRAME_HEADER = "Reply to this:"
"""The first line of a ``frame`` prompt."""
NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                "fifteen sixteen seventeen eighteen nineteen twenty").split()
# a whole run of digits, not inside a word (x2, 2x) nor part of a longer numeral (3.5, 1,200, 2-4, -3)
_STANDALONE = re.compile(r"(?<![\w.,:/+\-])[0-9]+(?![\w,:/+\-]|\.[0-9])")


@dataclass(frozen=True)
class Transform:
    """A built-in prompt transform and the built-in abilities whose prompts it is defined on."""

    fn: Callable[[str], str]
    """The rewording: a built-in record's user message text -> the conjugate prompt's."""
    abilities: tuple[str, ...]
    """The built-in abilities it applies to."""

    def __call__(self, text: str) -> str:
        return self.fn(text)


TRANSFORMS: Registry[Transform] = Registry("prompt transform")
"""The built-in prompt transforms by name: ``frame``, ``words``, ``no_format`` (see the module docstring)."""


def split_instruction(text: str) -> tuple[str, str]:
    """``(question, instruction line)``: the answer-format line when it is the last line of ``text``,
    else ``(text, "")``."""
    head, sep, last = text.rpartition("\n")
    return (head, last) if sep and _INSTRUCTION.fullmatch(last) else (text, "")


def frame(text: str) -> str:
    """The question under the line ``Reply to this:``, then a blank line and the instruction line."""
    question, line = split_instruction(text)
    return f"{FRAME_HEADER}\n{question}" + (f"\n\n{line}" if line else "")


def _word(m: re.Match) -> str:
    digits = m.group()
    return NUMBER_WORDS[int(digits)] if str(int(digits)) == digits and int(digits) < len(NUMBER_WORDS) else digits


def words(text: str) -> str:
    """Standalone integers 0-20 of the question as English words; the instruction line unchanged."""
    question, line = split_instruction(text)
    return _STANDALONE.sub(_word, question) + (f"\n{line}" if line else "")


def no_format(text: str) -> str:
    """The question without its instruction line (unchanged when it has none)."""
    return split_instruction(text)[0]


TRANSFORMS.add("frame", Transform(frame, ("arithmetic", "code", "echo", "general", "math")), doc=frame.__doc__)
TRANSFORMS.add("words", Transform(words, ("math",)), doc=words.__doc__)
TRANSFORMS.add("no_format", Transform(no_format, ("code", "general", "math")), doc=no_format.__doc__)


@dataclass(frozen=True)
class _Template:
    """A user template over ``{prompt}``."""

    text: str

    def __call__(self, prompt: str) -> str:
        return self.text.format(prompt=prompt)


def _template(spec: str) -> _Template:
    fix = "write a literal brace as {{ or }}"
    try:
        fields = [(f, fmt, conv) for _, f, fmt, conv in string.Formatter().parse(spec) if f is not None]
    except ValueError as e:
        raise ConfigError(f"transform template {spec!r}: {e}; {fix}") from None
    other = sorted({f for f, _, _ in fields if f != "prompt"})
    if other:
        shown = ", ".join("{" + f + "}" for f in other)
        raise ConfigError(f"transform template {spec!r} names {shown}; the only field is {{prompt}} ({fix})")
    if any(s or c for _, s, c in fields):
        raise ConfigError(f"transform template {spec!r}: write {{prompt}} without a conversion or format spec")
    if not fields:
        raise ConfigError(f"transform template {spec!r} has no {{prompt}} field, where the prompt goes ({fix})")
    return _Template(spec)


def _imported(spec: str) -> Callable[[str], str]:
    module, sep, name = spec.removeprefix("python:").partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"transform {spec!r}: expected python:module:function, e.g. python:my_prompts:translate")
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as e:  # the user's module: any error on import is theirs to see
        raise ConfigError(f"transform {spec!r}: cannot import it ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"transform {spec!r}: {module}.{name} is a {type(fn).__name__}, not a function str -> str")
    return fn


def get_transform(spec: str) -> Callable[[str], str]:
    """The prompt transform ``spec`` names: a name of :data:`TRANSFORMS` (its function), a template
    with the field ``{prompt}``, or ``python:module:function`` (imported).

    Raises:
        ConfigError: a template with another field, no ``{prompt}`` or an unmatched brace; a
            ``python:`` spec that cannot be imported or is not callable; an unknown name
            (:class:`UnknownNameError`, with close matches).
    """
    if spec.startswith("python:"):
        return _imported(spec)
    if "{" in spec or "}" in spec:
        return _template(spec)
    try:
        return TRANSFORMS.get(spec).fn
    except UnknownNameError as e:
        raise UnknownNameError(f"{e}; or a template with {{prompt}}, or python:module:function") from None


def applies(spec: str, ability: str, tasks: Mapping[str, object] | None = None) -> bool:
    """Whether the transform ``spec`` applies to ``ability`` (see the module docstring): a built-in
    transform to the built-in abilities it lists, a user transform to every built-in ability and to
    the generate tasks of ``tasks``."""
    if tasks and ability in tasks:
        return spec not in TRANSFORMS and isinstance(tasks[ability], GenerateTask)
    return ability in TRANSFORMS.get(spec).abilities if spec in TRANSFORMS else True


def conjugate_scores(model, tokenizer, abilities: list[str], transforms: list[str], *,
                     tasks: Mapping[str, object] | None = None, n: int = 200, seed: int = 0, difficulty: int = 1,
                     batch_size: int = 64, progress=None) -> dict[str, dict[str, AbilityScore]]:
    """Scores of ``model`` on ``abilities`` under each prompt transform of ``transforms``:
    ``{transform spec: {ability: score}}`` (:func:`mixtune.eval.run.evaluate` with ``transform``).

    With the plain evaluation's ``n``, ``seed`` and ``difficulty``, every transform scores the same
    problems as the plain one, in the same order, with the same gold answers; only the prompt
    text differs (the examples show the transformed prompt), so the two pair problem by problem.
    A transform's dict leaves out the abilities it does not apply to (:func:`applies`); it may be
    empty. Every spec and ability is checked before anything is generated.

    Raises:
        ConfigError: a bad transform spec (:func:`get_transform`) or an unknown ability.
    """
    fns = {spec: get_transform(spec) for spec in transforms}
    for a in abilities:
        if not (tasks and a in tasks):
            ABILITIES.get(a)
    out = {}
    for spec, fn in fns.items():
        names = [a for a in abilities if applies(spec, a, tasks)]
        if len(names) < len(abilities):
            log.info("transform %s does not apply to %s", spec, ", ".join(a for a in abilities if a not in names))
        out[spec] = evaluate(model, tokenizer, names, n=n, seed=seed, difficulty=difficulty, batch_size=batch_size,
                             progress=progress, tasks=tasks, transform=fn) if names else {}
    return out
