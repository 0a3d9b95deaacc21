"""Scorers on hand-made outputs: each rule, and outputs that must score 0 without crashing."""

from decimal import Decimal

import pytest

from mixtune.core import ConfigError
from mixtune.data.scorers import SCORERS, ScorerParams, check_scorer, extract_number, normalise


def score(name, output, refs, **kw):
    return SCORERS.get(name)(output, refs, ScorerParams(**kw))


def test_exact_normalises_white_space_and_optionally_case_punctuation_articles():
    assert score("exact", "  Paris \n", ["Paris"]) == 1.0
    assert score("exact", "paris", ["Paris"]) == 0.0
    assert score("exact", "paris", ["Paris"], ignore_case=True) == 1.0
    assert score("exact", "The Paris!", ["paris"], ignore_case=True, ignore_punctuation=True,
                 ignore_articles=True) == 1.0
    assert score("exact", "Lyon", ["Paris", "Lyon"]) == 1.0  # any reference


def test_numeric_extraction_rules():
    # GSM8K's strict rule: the number after ####, commas dropped
    assert extract_number("so 3 + 4 = 7\n#### 1,234", "gsm8k") == Decimal("1234")
    assert extract_number("no marker 42", "gsm8k") is None
    assert extract_number("first 3, then 12.5 and finally -7", "last_number") == Decimal("-7")
    assert extract_number(r"so \boxed{\frac{1}{2}} or \boxed{42}", "boxed") == Decimal("42")
    assert extract_number(r"\boxed{x^{2}+3}", "boxed") == Decimal("3")  # braces balanced, last number inside
    assert extract_number("nothing here", "last_number") is None


def test_numeric_compares_values_and_reads_gsm8k_references():
    # the reference is a GSM8K solution: its own number after ####
    assert score("numeric", "The answer is 18.", ["Janet sells 16 - 3 - 4 = 9 ... #### 18"]) == 1.0
    assert score("numeric", "18.0", ["18"]) == 1.0
    assert score("numeric", "19", ["18"]) == 0.0
    assert score("numeric", "18.04", ["18"], tolerance=0.05) == 1.0
    assert score("numeric", "#### 5\nlater 7", ["5"], extract="gsm8k") == 1.0
    assert score("numeric", "no number", ["5"]) == 0.0


def test_regex_and_contains():
    assert score("regex", "Answer: (B) because", ["B"], pattern=r"\(([A-D])\)") == 1.0
    assert score("regex", "no letter", ["B"], pattern=r"\(([A-D])\)") == 0.0
    assert score("regex", "final: c", ["C"], pattern=r"final: (\w)", ignore_case=True) == 1.0
    with pytest.raises(ConfigError, match="needs `pattern`"):
        score("regex", "x", ["x"])
    assert score("contains", "I think it is Paris, France", ["paris"], ignore_case=True) == 1.0
    assert score("contains", "London", ["Paris"]) == 0.0
    assert score("contains", "anything", [""]) == 0.0  # an empty reference matches nothing


def test_unknown_or_unimportable_scorers_are_config_errors():
    with pytest.raises(ConfigError, match="unknown scorer 'exakt'. Did you mean: exact"):
        check_scorer("exakt")
    with pytest.raises(ConfigError, match="cannot import it"):
        check_scorer("no_such_module_xyz:score")
    check_scorer("json:dumps")  # importable and callable


def test_normalise():
    assert normalise("  A  cat\tsat ", ScorerParams(ignore_case=True, ignore_articles=True)) == "cat sat"
