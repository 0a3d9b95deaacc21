"""docs/recipes.md is generated from the schemas: it must match them, and every key must say what it does."""

import re
from pathlib import Path

from mixtune.reference import recipes_reference

ROOT = Path(__file__).resolve().parents[1]


def test_docs_recipes_md_is_the_generated_reference():
    text = recipes_reference()
    assert (ROOT / "docs" / "recipes.md").read_text() == text, \
        "docs/recipes.md is stale: run `python -m mixtune.reference > docs/recipes.md`"


def test_every_key_is_described():
    rows = [line for line in recipes_reference().splitlines() if line.startswith("| `")]
    assert len(rows) >= 100  # the whole schema, not one section
    blank = [row for row in rows if re.search(r"\|\s*\|$", row)]
    assert not blank, f"keys without a docstring under their field: {blank}"


def test_the_reference_names_the_sections_a_recipe_has():
    text = recipes_reference()
    for section in ("`sources.NAME`: SourceConfig", "`train`: TrainConfig", "`mixture.sources.NAME`: Take",
                    "`train.method`: LoraParams (name: lora)", "`eval`: EvalConfig"):
        assert f"## {section}" in text
