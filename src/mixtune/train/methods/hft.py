"""``hft``: Half Fine-Tuning, half of every block's matrices train, re-drawn at every stage."""

from __future__ import annotations

import random
import re
from typing import Literal

from pydantic import Field

from mixtune.core import ConfigError, Strict
from mixtune.core.names import layer_index
from mixtune.core.seeds import seed_int
from mixtune.train.methods.base import register, save_full


class HftParams(Strict):
    name: Literal["hft"] = "hft"
    attention: list[str] = Field(default=["q_proj", "k_proj", "v_proj", "o_proj"], min_length=2)
    """Names of each block's attention matrices; half of them train in every block."""
    ffn: list[str] = Field(default=["gate_proj", "up_proj", "down_proj"], min_length=1)
    """Names of each block's feed-forward matrices; half of all of them train."""


def select(names: list[str], p: HftParams, seed: int, stage: int) -> set[str]:
    """The parameter names that train in ``stage``: per block, a random half of the attention
    matrices; in a random half of the blocks (rounded down) the larger half of the FFN matrices
    (2 of 3), in the others the smaller half (1 of 3), so half of all FFN matrices train when the
    block count is even. A matrix's bias follows its weight. Seeded by (seed, stage)."""
    rng = random.Random(seed_int(seed, "hft", stage, bits=64))
    by_block: dict[int, dict[str, list[str]]] = {}
    for n in names:
        block = layer_index(n)
        module = re.sub(r"\.(weight|bias)$", "", n).rsplit(".", 1)[-1]
        if block is not None and module in (*p.attention, *p.ffn):
            by_block.setdefault(block, {}).setdefault(module, []).append(n)
    if not by_block:
        raise ConfigError(f"hft: no block parameters named {p.attention + p.ffn} (set train.method.attention "
                          "and train.method.ffn to this model's matrix names)")
    blocks = sorted(by_block)
    wide = set(rng.sample(blocks, len(blocks) // 2))  # blocks whose FFN trains its larger half
    chosen = set()
    for b in blocks:
        attn = [m for m in p.attention if m in by_block[b]]
        ffn = [m for m in p.ffn if m in by_block[b]]
        picks = rng.sample(attn, len(attn) // 2)
        picks += rng.sample(ffn, (len(ffn) + 1) // 2 if b in wide else len(ffn) // 2)
        for m in picks:
            chosen.update(by_block[b][m])
    return chosen


def prepare(model, p: HftParams, seed: int):
    """Half Fine-Tuning (Hui et al., 2025, arXiv:2404.18466, Sec. 3): freeze a random half of the
    parameters, chosen per block at matrix level (2 of the 4 attention matrices; 2 of 3 FFN
    matrices in half of the blocks, 1 of 3 in the rest), and fully fine-tune the other half; a
    new half is drawn at every stage. Embeddings, norms and the head stay frozen (the paper's
    rule covers block matrices only). Frozen parameters get no optimizer state."""
    start_stage(model, p, seed, 0)
    return model


def start_stage(model, p: HftParams, seed: int, stage: int) -> None:
    named = dict(model.named_parameters())
    chosen = select(list(named), p, seed, stage)
    for n, param in named.items():
        param.requires_grad_(n in chosen)


register("hft", HftParams, prepare=prepare, export=lambda model, p, out, sd: save_full(model, out, sd),
         start_stage=start_stage)
