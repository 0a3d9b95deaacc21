"""Runs the stages in order. Only this module and the CLI see every stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mixtune.builtin import builtin_tokenizer
from mixtune.data.format import Example, Packed, pack, tokenize_records
from mixtune.data.mixture import Mixture, mix
from mixtune.data.sources import load_source
from mixtune.models import load_tokenizer
from mixtune.recipe import Recipe


@dataclass(frozen=True)
class PreparedData:
    """A recipe's data, mixed, tokenized and packed."""

    mixture: Mixture
    examples: list[Example]
    packed: Packed
    source_names: list[str]
    tokenizer: object


def tokenizer_for(model: str):
    """The tokenizer of a recipe's ``model``."""
    return builtin_tokenizer() if model.startswith("builtin:") else load_tokenizer(model)


def prepare_data(recipe: Recipe, base_dir: str | Path = ".") -> PreparedData:
    """Load every source, sample the mixture, tokenize with label masks, pack into rows."""
    loaded = {name: load_source(name, cfg, seed=recipe.seed, base_dir=base_dir) for name, cfg in recipe.sources.items()}
    mixture = mix(recipe.resolved_mixture(), loaded, seed=recipe.seed)
    tokenizer = tokenizer_for(recipe.model)
    examples = tokenize_records(mixture.records, tokenizer)
    names = [o.source for o in mixture.outcomes]
    packed = pack(
        examples,
        recipe.format.seq_len,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        sources=[names.index(r["source"]) for r in mixture.records],
        long_examples=recipe.format.long_examples,
        where=[f"source {r['source']!r} example {i}" for i, r in enumerate(mixture.records)],
    )
    return PreparedData(mixture, examples, packed, names, tokenizer)
