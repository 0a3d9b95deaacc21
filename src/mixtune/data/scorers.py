"""Scorers for generated answers: the model's output and the references in, a score in [0, 1] out.

Each is a plain function ``scorer(output, references, params) -> float``, registered by name, so an
ability from a file picks one with ``scorer: NAME``; a user's own is named by dotted path
(``package.module:function``, called as ``function(output, record) -> float``). No output can
crash a scorer: anything it cannot read scores 0.

============  ==============================================================================
``exact``     equal to a reference after normalisation (white space folded; optionally case,
              punctuation and articles ignored, as SQuAD's normalisation does)
``numeric``   the number ``extract`` finds in the output equals a reference's (GSM8K's
              ``#### 42``, the last number, or the last ``\\boxed{}``), commas and a trailing
              ``.0`` ignored
``regex``     the first group of ``pattern``'s last match, then as ``exact``
``contains``  a normalised reference occurs in the normalised output
============  ==============================================================================
"""

from __future__ import annotations

import importlib
import re
import string
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Literal

from pydantic import Field

from mixtune.core import ConfigError, Registry, Strict


class ScorerParams(Strict):
    """How an answer is compared (each scorer reads the fields it needs)."""

    ignore_case: bool = False
    """exact / regex / contains: compare case-insensitively."""
    ignore_punctuation: bool = False
    """exact / regex / contains: drop ASCII punctuation before comparing."""
    ignore_articles: bool = False
    """exact / regex / contains: drop the English articles a, an, the (SQuAD's normalisation)."""
    ignore_patterns: list[str] = []
    """exact / regex / contains: regular expressions removed from both sides first (lm-eval's
    ``regexes_to_ignore``)."""
    fold_whitespace: bool = True
    """exact / regex / contains: strip the ends and fold runs of white space (lm-eval's exact_match
    does not: set false to compare as it does)."""
    occurrence: Literal["first", "last"] = "last"
    """regex: which match is the answer (lm-eval's regex filter takes the first)."""
    extract: Literal["gsm8k", "last_number", "boxed"] = "last_number"
    """numeric: where the number is, in the output and in a reference that is not a bare number:
    ``gsm8k`` the number after ``####`` (lm-eval's gsm8k strict match), ``last_number`` the last
    number in the text, ``boxed`` the content of the last ``\\boxed{...}``."""
    pattern: str | None = None
    """regex: a Python regular expression whose first group (or whole match) is the answer."""
    tolerance: float = Field(default=0.0, ge=0)
    """numeric: largest absolute difference still counted as equal."""


Scorer = Callable[[str, list[str], ScorerParams], float]
SCORERS: Registry[Scorer] = Registry("scorer")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_GSM8K = re.compile(r"####\s*(-?[0-9.,]+)")


def normalise(text: str, p: ScorerParams) -> str:
    """Patterns removed, then case, punctuation and articles dropped when ``p`` asks, white space folded
    (in lm-eval's exact_match order: patterns, case, punctuation)."""
    for pattern in p.ignore_patterns:
        text = re.sub(pattern, "", text)
    if p.ignore_case:
        text = text.lower()
    if p.ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if p.ignore_articles:
        text = re.sub(r"\b(a|an|the)\b", " ", text, flags=re.IGNORECASE)
    return " ".join(text.split()) if p.fold_whitespace else text


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, braces balanced."""
    at = text.rfind("\\boxed{")
    if at < 0:
        return None
    depth, start = 0, at + len("\\boxed{")
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[start:i]
    return None


def extract_number(text: str, how: str) -> Decimal | None:
    """The number ``how`` points at in ``text`` (see :class:`ScorerParams`.extract), or None."""
    if how == "gsm8k":
        found = _GSM8K.findall(text)
        raw = found[-1] if found else None
    elif how == "boxed":
        inner = _boxed(text)
        numbers = _NUMBER.findall(inner) if inner is not None else []
        raw = numbers[-1] if numbers else None
    else:
        numbers = _NUMBER.findall(text)
        raw = numbers[-1] if numbers else None
    if raw is None:
        return None
    try:
        return Decimal(raw.replace(",", "").rstrip("."))
    except InvalidOperation:
        return None


def _reference_number(ref: str, how: str) -> Decimal | None:
    bare = ref.strip().replace(",", "")
    try:
        return Decimal(bare)
    except InvalidOperation:
        return extract_number(ref, how)  # e.g. a GSM8K solution ending in "#### 42"


@SCORERS.register("exact")
def exact(output: str, references: list[str], p: ScorerParams) -> float:
    """Exact match after normalisation (SQuAD, Rajpurkar et al., 2016, when all ignore_* are on)."""
    got = normalise(output, p)
    return float(any(got == normalise(r, p) for r in references))


@SCORERS.register("numeric")
def numeric(output: str, references: list[str], p: ScorerParams) -> float:
    """Numeric match of an extracted answer (GSM8K, Cobbe et al., 2021: the number after ``####``)."""
    got = extract_number(output, p.extract)
    if got is None:
        return 0.0
    refs = [_reference_number(r, p.extract) for r in references]
    return float(any(r is not None and abs(got - r) <= Decimal(str(p.tolerance)) for r in refs))


@SCORERS.register("regex")
def regex(output: str, references: list[str], p: ScorerParams) -> float:
    """The first group of the pattern's last match, compared as ``exact``."""
    if p.pattern is None:
        raise ConfigError("scorer regex needs `pattern`, a regular expression whose first group is the answer")
    matches = list(re.finditer(p.pattern, output))
    if not matches:
        return 0.0
    m = matches[0 if p.occurrence == "first" else -1]
    found = next((g for g in m.groups() if g), "") if m.groups() else m.group(0)  # the first group that matched
    return exact(found.strip(), references, p)


@SCORERS.register("contains")
def contains(output: str, references: list[str], p: ScorerParams) -> float:
    """A normalised reference occurs in the normalised output."""
    got = normalise(output, p)
    return float(any(normalise(r, p) and normalise(r, p) in got for r in references))


def user_scorer(dotted: str) -> Callable[[str, dict], float]:
    """``package.module:function``, imported; called as ``function(output, record) -> float``.

    Raises:
        ConfigError: the module or the function cannot be found.
    """
    module, sep, name = dotted.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"scorer {dotted!r}: expected a built-in scorer ({', '.join(SCORERS)}) or "
                          "'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"scorer {dotted!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise ConfigError(f"scorer {dotted!r} is not a function")
    return fn


def check_scorer(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is a registered scorer or an importable dotted path."""
    if ":" in name:
        user_scorer(name)
    else:
        SCORERS.get(name)


__all__ = ["SCORERS", "ScorerParams", "check_scorer", "extract_number", "normalise", "user_scorer"]
