"""``full``: every parameter trains."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from mixtune.core import Strict
from mixtune.train.methods.base import register


class FullParams(Strict):
    name: Literal["full"] = "full"


def prepare(model, p: FullParams, seed: int):
    """Full fine-tuning: all parameters require gradients."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def export(model, p: FullParams, out_dir: Path, state_dict: dict | None) -> None:
    model.save_pretrained(out_dir, state_dict=state_dict)


register("full", FullParams, prepare=prepare, export=export)
