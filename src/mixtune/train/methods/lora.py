"""``lora``: low-rank adapters through ``peft`` (saved as an ordinary peft adapter)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

from pydantic import Field

from mixtune.core import ConfigError, Strict
from mixtune.train.methods.base import register


class LoraParams(Strict):
    name: Literal["lora"] = "lora"
    r: int = Field(default=8, ge=1)
    """Adapter rank."""
    alpha: float = Field(default=16, gt=0)
    """Scale numerator: the update is (alpha / r) B A x."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]), or every linear layer but the output head."""
    merge: bool = False
    """Also write the base with the adapter merged in, as a full model in ``merged/``."""


def prepare(model, p: LoraParams, seed: int):
    """LoRA (Hu et al., 2021, arXiv:2106.09685), Eq. 3: h = W0 x + (alpha / r) B A x, with W0 frozen,
    A ~ Kaiming-uniform and B = 0 at start (peft's defaults)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=p.target_modules,
                        task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"train.method.target_modules = {p.target_modules!r}: {e}") from None


def export(model, p: LoraParams, out_dir: Path, state_dict: dict | None) -> None:
    model.save_pretrained(out_dir, state_dict=state_dict)
    if p.merge:
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(out_dir / "merged")


register("lora", LoraParams, prepare=prepare, export=export)
