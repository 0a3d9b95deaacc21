"""What every built-in ability shares: the record shape, the train/test split rule,
the answer-extraction rule and the sampling loop.

Answer extraction (one rule for every built-in scorer): the answer is the text
after the **last** ``Answer:`` (any case) in the model output, up to the end of
that line, with surrounding whitespace removed. Output with no ``Answer:`` has
no answer and scores 0. Scorers accept any value (``None``, bytes, huge or
binary text) and never raise.

Answer format in the prompt: a scored ability names what its ``Answer:`` line holds
(:attr:`Ability.answer_format`, e.g. ``<number>``), and :meth:`Ability.generate` ends every
prompt, train and test split alike, with a line that asks for it::

    End your reply with "Answer: <number>".

so a model that never saw the suite knows the format it is scored by, and the built-in model
is trained on the very prompts it is evaluated on. The line is added to the record, not to the
:class:`Problem`: it is wording, so it is not part of the structure key and never moves the split.

Split rule: each problem has a canonical key describing its *structure* (the
numbers and operations, the program text, the task and its words), not its
surface wording. ``sha256(ability|key)`` puts one key in five into ``test`` and
the rest into ``train``, so the splits never share a problem, whatever the seed
or the number of examples drawn. An ability marked ``held_out=False`` (a knowledge
corpus such as ``arithmetic``) skips the rule: both splits draw from every problem.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from mixtune.core import DataError, Registry

Split = Literal["train", "test"]
TEST_BUCKETS = 5  # one key in TEST_BUCKETS is a test problem
ANSWER_INSTRUCTION = 'End your reply with "Answer: {}".'
"""The last line of a scored ability's prompts; ``{}`` is the ability's :attr:`Ability.answer_format`."""
MAX_DIFFICULTY = 3


@dataclass(frozen=True)
class Problem:
    """One generated problem before it becomes a chat record."""

    key: str
    """Canonical structure of the problem; decides its split and its identity."""
    prompt: str
    response: str
    """The full assistant turn (chain of thought, then ``Answer: ...``)."""
    answer: str
    """The gold answer exactly as the response's ``Answer:`` line states it."""


@dataclass(frozen=True)
class Ability:
    """A built-in ability: a seeded generator and an exact scorer."""

    name: str
    description: str
    make_problem: Callable[[random.Random, int], Problem]
    """Draws one problem of the given difficulty from the random stream."""
    match: Callable[[str, str], bool]
    """``match(predicted, gold)`` on extracted answers."""
    version: int = 1
    """Bumped whenever generated problems or scoring change, so results stay comparable."""
    higher_is_better: bool = True
    difficulties: dict[int, str] = field(default_factory=dict)
    """What each difficulty level means, for ``mixtune list``."""
    held_out: bool = True
    """Whether the split rule holds test problems out of ``train``. False only for knowledge
    corpora, whose every item a model is meant to have seen (see the module docstring)."""
    answer_format: str = ""
    """What the ``Answer:`` line holds, as the prompt states it (``<number>``); every prompt then
    ends with :attr:`instruction`. Empty for a pretraining corpus whose prompts do not ask."""

    @property
    def instruction(self) -> str:
        """The line that ends each prompt and states the answer format ("" without :attr:`answer_format`)."""
        return ANSWER_INSTRUCTION.format(self.answer_format) if self.answer_format else ""

    def generate(self, n: int, *, seed: int = 0, split: Split = "train", difficulty: int = 1) -> list[dict]:
        """``n`` distinct problems of one split as chat records, the same for the same arguments.

        Raises:
            DataError: the split holds fewer than ``n`` distinct problems at this difficulty.
        """
        return [to_record(self.name, p, self.instruction)
                for p in self.problems(n, seed=seed, split=split, difficulty=difficulty)]

    def problems(self, n: int, *, seed: int = 0, split: Split = "train", difficulty: int = 1,
                 stream: str | None = None, exclude: Collection[str] = ()) -> list[Problem]:
        """The :class:`Problem` s of :meth:`generate`, in its order.

        ``stream`` names the random stream instead of ``split`` (``validation``: other problems of the
        held-out split than the test ones drawn with the same seed), and problems whose key is in
        ``exclude`` are skipped, so a sample can be kept apart from another by structure.

        Raises:
            DataError: the split holds fewer than ``n`` distinct problems at this difficulty.
        """
        if split not in ("train", "test"):
            raise DataError(f"ability {self.name}: split must be 'train' or 'test', got {split!r}")
        if not 1 <= difficulty <= MAX_DIFFICULTY:
            raise DataError(f"ability {self.name}: difficulty must be 1..{MAX_DIFFICULTY}, got {difficulty!r}")
        if n < 0:
            raise DataError(f"ability {self.name}: n must be >= 0, got {n}")
        rng = random.Random(f"{self.name}|{stream or split}|{difficulty}|{seed}")
        seen: set[str] = set()
        out: list[Problem] = []
        misses = 0
        while len(out) < n:
            p = self.make_problem(rng, difficulty)
            if (self.held_out and split_of(self.name, p.key) != split) or p.key in seen or p.key in exclude:
                misses += 1
                # Give up only when new problems have become very rare: the space is exhausted.
                if misses > 1000 + 50 * len(out):
                    besides = f" besides the {len(exclude)} set apart" if exclude else ""
                    raise DataError(
                        f"ability {self.name}: found only {len(out)} distinct {split} problems{besides} at "
                        f"difficulty {difficulty}, {n} were asked; ask for fewer or raise the difficulty"
                    )
                continue
            seen.add(p.key)
            out.append(p)
        return out

    def score(self, output: Any, record: dict) -> float:
        """1.0 when the answer extracted from ``output`` matches the record's gold answer, else 0.0."""
        predicted = extract_answer(output)
        if predicted is None:
            return 0.0
        try:
            return 1.0 if self.match(predicted, str(record["answer"])) else 0.0
        except (KeyError, TypeError, ValueError):
            return 0.0


ABILITIES: Registry[Ability] = Registry("ability")


def split_of(ability: str, key: str) -> Split:
    """``test`` for one key in :data:`TEST_BUCKETS` (by SHA-256, stable across runs), else ``train``."""
    digest = hashlib.sha256(f"{ability}|{key}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_BUCKETS == 0 else "train"


def to_record(ability: str, p: Problem, instruction: str = "") -> dict:
    """The chat record of ``p``; a non-empty ``instruction`` becomes the prompt's last line."""
    prompt = f"{p.prompt}\n{instruction}" if instruction else p.prompt
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": p.response}],
        "ability": ability,
        "answer": p.answer,
    }


def extract_answer(output: Any) -> str | None:
    """The text after the last ``Answer:`` up to the line end, stripped; None if there is none."""
    if isinstance(output, bytes):
        output = output.decode("utf-8", errors="replace")
    if not isinstance(output, str):
        return None
    at = output.lower().rfind("answer:")
    if at < 0:
        return None
    return output[at + len("answer:"):].split("\n", 1)[0].strip()


def same_text(predicted: str, gold: str) -> bool:
    """Equal after collapsing runs of whitespace (case and punctuation count)."""
    return " ".join(predicted.split()) == " ".join(gold.split())


def same_integer(predicted: str, gold: str) -> bool:
    """Equal as integers; a trailing full stop is allowed ("6." == "6"), "6.0" or "six" is not."""
    text = predicted.rstrip(".").strip()
    if not text.lstrip("+-").isdigit() or len(text) > 40:
        return False
    return int(text) == int(gold)
