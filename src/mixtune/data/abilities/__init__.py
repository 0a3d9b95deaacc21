"""The built-in ability suite: one module per ability, each a seeded generator plus an exact scorer.

Importing this package registers ``arithmetic``, ``code``, ``echo``, ``general`` and ``math`` in :data:`ABILITIES`.
"""

from mixtune.data.abilities import arithmetic, code, echo, general, math  # noqa: F401  (registration)
from mixtune.data.abilities.base import ABILITIES, Ability, Problem, extract_answer, split_of

__all__ = ["ABILITIES", "Ability", "Problem", "extract_answer", "split_of"]
