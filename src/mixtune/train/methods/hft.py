"""``hft``: Half Fine-Tuning, half of every block's matrices train, re-drawn at every stage.

Blocks and their attention and FFN matrices come from the module tree
(:func:`mixtune.models.structure.find_structure`), so GPT-2's ``Conv1D`` layers, Phi-2's ``fc1``/``fc2``
and NeoX's ``query_key_value`` are found without naming them. **A fused projection is one unit**:
Phi-3's ``qkv_proj`` and ``gate_up_proj``, GPT-2's ``c_attn`` and NeoX's ``query_key_value`` train or
freeze whole, as the matrix they are stored as. Splitting their rows would need each layout (NeoX
interleaves q, k, v per head; GPT-2 stacks them in columns), a gradient mask, and an optimizer that
neither keeps state for nor weight-decays the frozen rows; HFT's rule is about parameter matrices,
and a fused matrix is one. So Phi-3 trains 1 of its 2 attention units per block, and 1 of its 2 FFN
units, and the share of parameters is half only on average (see :data:`SHARE`).
"""

from __future__ import annotations

import random
from typing import Annotated, Literal

from pydantic import Field

from mixtune.core import ConfigError, Strict
from mixtune.core.seeds import seed_int
from mixtune.models.structure import Block, Matrix, Structure, find_structure
from mixtune.train.methods.base import check_share, register, save_full

SHARE = (0.25, 0.75)
"""The share of the block matrices' parameters HFT must train. Matrices are drawn by count, not by
size, so the share is 1/2 in expectation but not exactly: with grouped-query attention k and v are
smaller than q and o, and a fused qkv is 3x its output projection. On the tested families the
rule's extremes are about 0.3 and 0.7 (every Phi-3-mini block drawing o_proj and down_proj: 0.31),
and many blocks average towards 1/2; outside 1/4-3/4 the structure was misread (names matching
almost nothing gave 0.13% on Phi-3), and that is an error."""


class HftParams(Strict):
    name: Literal["hft"] = "hft"
    attention: Annotated[list[str], Field(min_length=2)] | None = None
    """Each block's attention matrices, by path relative to the block or its last part (q_proj,
    attn.c_proj); half of them train in every block. Default (null): detected from the model's structure."""
    ffn: Annotated[list[str], Field(min_length=1)] | None = None
    """Each block's feed-forward matrices, named the same way; half of all of them train. Default
    (null): detected from the model's structure."""


def units(structure: Structure, p: HftParams) -> list[tuple[list[Matrix], list[Matrix]]]:
    """Per block, the attention and FFN matrices HFT draws from: those ``p`` names (looked up in
    each block), or every one the structure found.

    Raises:
        ConfigError: a name matches no matrix or several of a block, one matrix is named twice, or a
            block has fewer than 2 attention or no FFN matrices (the message names the block).
    """
    out = []
    for block in structure.blocks:
        attn = _named(block, p.attention, "attention")
        ffn = _named(block, p.ffn, "ffn")
        if len({id(m) for m in attn + ffn}) < len(attn) + len(ffn):
            raise ConfigError(f"hft: train.method.attention and train.method.ffn name one matrix of {block.kind} "
                              "twice; each matrix belongs to one of them")
        if len(attn) < 2 or not ffn:
            raise ConfigError(f"hft: {block.kind} ({block.name}) has attention [{_paths(attn)}] and FFN "
                              f"[{_paths(ffn)}]; expected at least 2 attention matrices and 1 FFN matrix per block "
                              "(name them with train.method.attention and train.method.ffn)")
        out.append((attn, ffn))
    return out


def _named(block: Block, names: list[str] | None, role) -> list[Matrix]:
    if names is None:
        return list(getattr(block, role))
    return [block.find(n, role, f"hft: train.method.{role}") for n in names]


def _paths(ms: list[Matrix]) -> str:
    return ", ".join(m.path for m in ms)


def _half(n: int, larger: bool) -> int:
    return (n + 1) // 2 if larger else n // 2


def select(structure: Structure, p: HftParams, seed: int, stage: int) -> set[str]:
    """The parameter names that train in ``stage``: per block, a random half of the attention
    matrices; in a random half of the blocks (rounded down) the larger half of the FFN matrices
    (2 of 3), in the others the smaller half (1 of 3), so half of all FFN matrices train when the
    block count is even (an odd attention count is balanced the same way). A matrix's bias follows
    its weight. Seeded by (seed, stage)."""
    rng = random.Random(seed_int(seed, "hft", stage, bits=64))
    per_block = units(structure, p)
    n = len(per_block)
    wide = set(rng.sample(range(n), n // 2))  # blocks whose FFN trains its larger half
    odd = any(len(attn) % 2 for attn, _ in per_block)
    wide_attn = set(rng.sample(range(n), n // 2)) if odd else set()  # drawn only when needed: Llama's draw is unchanged
    chosen: set[str] = set()
    for b, (attn, ffn) in enumerate(per_block):
        picks = rng.sample(attn, _half(len(attn), b in wide_attn))
        picks += rng.sample(ffn, _half(len(ffn), b in wide))
        for m in picks:
            chosen.update(m.parameters())
    return chosen


def prepare(model, p: HftParams, seed: int):
    """Half Fine-Tuning (Hui et al., 2025, arXiv:2404.18466, Sec. 3): freeze a random half of the
    parameters, chosen per block at matrix level (2 of the 4 attention matrices; 2 of 3 FFN
    matrices in half of the blocks, 1 of 3 in the rest), and fully fine-tune the other half; a
    new half is drawn at every stage. Embeddings, norms and the head stay frozen (the paper's
    rule covers block matrices only). Frozen parameters get no optimizer state. Blocks and
    matrices come from the module tree; a fused projection (qkv_proj, c_attn, gate_up_proj) is one
    unit. The trained share of the block matrices' parameters is checked to lie in 1/4-3/4."""
    start_stage(model, p, seed, 0)
    return model


def start_stage(model, p: HftParams, seed: int, stage: int) -> None:
    structure = find_structure(model, "hft")
    chosen = select(structure, p, seed, stage)
    named = dict(model.named_parameters())
    for n, param in named.items():
        param.requires_grad_(n in chosen)
    pool = sum(m.numel() for attn, ffn in units(structure, p) for m in attn + ffn)
    check_share("hft", model, trained=sum(named[n].numel() for n in chosen if n in named), intended=pool,
                of=f"block-matrix parameters of {len(structure.blocks)} {structure.kind}s", low=SHARE[0],
                high=SHARE[1], why="HFT trains about half of the block matrices; check train.method.attention / ffn")


register("hft", HftParams, prepare=prepare, export=lambda model, p, out, sd: save_full(model, out, sd),
         start_stage=start_stage)
