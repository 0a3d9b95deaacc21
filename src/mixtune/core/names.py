"""Parameter names: which transformer block a tensor belongs to."""

from __future__ import annotations

import re

LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
"""A transformer block index in a parameter name (``model.layers.12.mlp...``), anchored on the block
container so that ``experts.3`` inside block 12 is not taken for block 3."""


def layer_index(name: str, pattern: re.Pattern = LAYER) -> int | None:
    """The block index in ``name``, or None for parameters outside the blocks (embeddings, final norm, head)."""
    m = pattern.search(name)
    return int(m.group(1)) if m else None
