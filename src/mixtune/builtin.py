"""The embedded default: the built-in model, with a tokenizer trained on the built-in suite."""

from __future__ import annotations

import os
from pathlib import Path

from mixtune.data.abilities import ABILITIES
from mixtune.models import build_tokenizer, init_tiny

CORPUS_PER_LEVEL = 400  # problems per ability and difficulty in the tokenizer corpus


def builtin_corpus() -> list[str]:
    """Text the built-in tokenizer is trained on: train-split problems of every ability and level.

    Fixed (seed 0), so every built-in model has the same tokenizer for the same mixtune version.
    """
    return [
        m["content"]
        for name in ABILITIES
        for level in (1, 2, 3)
        for r in ABILITIES.get(name).generate(CORPUS_PER_LEVEL, seed=0, split="train", difficulty=level)
        for m in r["messages"]
    ]


def builtin_tokenizer():
    """The built-in model's tokenizer, built in memory (well under a second)."""
    return build_tokenizer(builtin_corpus())


def init_builtin(out_dir: str | os.PathLike, *, size: str = "tiny", seed: int = 0, overwrite: bool = False) -> Path:
    """Write a freshly initialised built-in model of ``size`` to ``out_dir``."""
    return init_tiny(out_dir, size=size, corpus=builtin_corpus(), seed=seed, overwrite=overwrite)
