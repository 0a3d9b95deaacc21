"""``full``: every parameter trains."""

from __future__ import annotations

from typing import Literal

from mixtune.core import Strict
from mixtune.train.methods.base import check_share, register, save_full


class FullParams(Strict):
    name: Literal["full"] = "full"


def prepare(model, p: FullParams, seed: int):
    """Full fine-tuning: all parameters require gradients."""
    for param in model.parameters():
        param.requires_grad_(True)
    n = sum(p.numel() for p in model.parameters())
    check_share("full", model, trained=sum(p.numel() for p in model.parameters() if p.requires_grad), intended=n,
                of="parameters")
    return model


register("full", FullParams, prepare=prepare, export=lambda model, p, out, sd: save_full(model, out, sd))
