"""``moe_lora``: train a mixture of LoRA experts in every feed-forward block (MixLoRA): the
experts, routers and attention LoRAs train, the base stays frozen; the router's load-balancing
loss joins the LM loss and per-ability routing counts are logged. The modules are
:mod:`mixtune.models.moe_lora`; a stage is saved as the experts alone (``moe_lora.safetensors``
and ``moe_lora.json``, which names the base), or with ``merge`` also as the base's folder with
the experts beside it in ``merged/``, which :func:`mixtune.models.load_model` reads alone."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import json

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save_file

from mixtune.core import CheckpointError, Strict
from mixtune.models.moe_lora import CONFIG, WEIGHTS, LoraLinear, MoeLoraMLP, attach, is_added, moe_modules, save
from mixtune.train.methods.base import check_share, register


class MoeLoraParams(Strict):
    name: Literal["moe_lora"] = "moe_lora"
    experts: int = Field(default=8, ge=1)
    """LoRA experts per feed-forward block (MixLoRA: 8)."""
    top_k: int = Field(default=2, ge=1)
    """Experts the router sends each token to (MixLoRA: 2)."""
    r: int = Field(default=8, ge=1)
    """Rank of every expert's LoRA (and of the attention LoRA)."""
    alpha: float = Field(default=16, gt=0)
    """Scale numerator: each LoRA adds (alpha / r) B A x."""
    aux_loss_coef: float = Field(default=0.01, ge=0)
    """alpha in the load-balancing loss alpha * E * sum_e f_e P_e."""
    router_init_range: float = Field(default=0.02, gt=0)
    """Standard deviation of the router's initial weights."""
    attention: list[str] = []
    """Attention projections that get a plain LoRA too, e.g. [q_proj, v_proj] (MixLoRA's example)."""
    merge: bool = False
    """Also write a self-contained folder in ``merged/``: the base's weights with the experts beside it."""


def prepare(model, p: MoeLoraParams, seed: int):
    """MixLoRA (Li et al., 2024, arXiv:2404.15159, Sec. 3): E LoRA experts share each frozen FFN,
    y = sum_{e in top-k} g_e / sum g * FFN_e(x) with g = softmax(W_r x), plus the load-balancing
    loss alpha * E * sum_e f_e P_e (f_e: share of tokens routed to e, P_e: mean router probability;
    Switch/Mixtral form, over every block's tokens at once). Defaults 8 experts, top-2, alpha 0.01."""
    torch.manual_seed(seed)
    model = attach(model, p)
    check_share("moe_lora", model, trained=sum(q.numel() for q in model.parameters() if q.requires_grad),
                intended=intended_size(model), of="expert, router and attention-LoRA parameters",
                why="the experts, routers and attention LoRAs are what trains")
    return model


def intended_size(model) -> int:
    """Parameters MixLoRA adds, from the layer shapes: per FFN of hidden size H and inner size I,
    E experts x (LoRA of gate, up: r (H + I) each; of down: r (I + H)) + the router E H; per
    attention LoRA r (in + out)."""
    n = 0
    for m in model.modules():
        if isinstance(m, LoraLinear):
            out_f, in_f = m.weight.shape
            n += m.lora_A.shape[0] * (in_f + out_f)
        elif isinstance(m, MoeLoraMLP):
            down = getattr(m, m.names.down)
            hidden, inner, r = down.out_features, down.in_features, m.gate_A.shape[1]
            n += m.experts * (3 * r * (hidden + inner) + hidden)
    return n


def before_forward(model, micro_batch: dict) -> None:
    """Remember which positions are real tokens (padding neither counts in the loss nor routes)."""
    model.mixtune_token_mask = (micro_batch["source_ids"] >= 0).reshape(-1)


def aux_loss(model):
    """The load-balancing loss over every block's real tokens (router probabilities in float32)."""
    mods = moe_modules(model)
    if not mods or mods[0].last is None:
        return None
    mask = getattr(model, "mixtune_token_mask", None)
    probs = torch.cat([m.last[0][mask.to(m.last[0].device)] if mask is not None else m.last[0] for m in mods])
    top = torch.cat([m.last[1][mask.to(m.last[1].device)] if mask is not None else m.last[1] for m in mods])
    if probs.shape[0] == 0:
        return None
    experts = probs.shape[-1]
    routed = F.one_hot(top, experts).sum(1).float().mean(0)  # f_e
    return model.mixtune_moe_lora.aux_loss_coef * experts * (routed * probs.mean(0)).sum()


def batch_stats(model, source_ids: torch.Tensor, n_sources: int) -> dict[str, torch.Tensor]:
    """``routing``: tokens of each source sent to each expert of each block (sources x blocks x experts)."""
    mods = moe_modules(model)
    sources = source_ids.reshape(-1)
    counts = torch.zeros(n_sources, len(mods), mods[0].experts if mods else 0)
    for b, m in enumerate(mods):
        top = m.last[1].cpu()
        real = sources >= 0
        hits = F.one_hot(top[real], m.experts).sum(1).float()  # tokens x experts
        counts[:, b].index_add_(0, sources[real], hits)
    return {"routing": counts}


def export(model, p: MoeLoraParams, out_dir: Path, state_dict: dict | None) -> None:
    """The experts, routers and attention LoRAs alone, in their training dtype; ``moe_lora.json``
    names the base they apply to (``base_model_name_or_path``, as a peft adapter does)."""
    sd = state_dict if state_dict is not None else model.state_dict()
    spec = p.model_dump(mode="json") | {"base_model_name_or_path": getattr(model, "name_or_path", None) or None}
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items() if is_added(k)}, str(Path(out_dir) / WEIGHTS))
    (Path(out_dir) / CONFIG).write_text(json.dumps(spec, indent=2))
    if p.merge:
        save(model, spec, Path(out_dir) / "merged", state_dict)


def load_export(model, p: MoeLoraParams, folder: Path) -> None:
    """Put exported experts back into the mixture ``prepare`` attached."""
    weights = load_file(str(Path(folder) / WEIGHTS))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    absent = [k for k in missing if is_added(k)]
    if absent or unexpected:
        raise CheckpointError(f"{folder}: {WEIGHTS} does not fit this mixture (missing {absent[:3]}, unexpected "
                              f"{list(unexpected)[:3]}); it was written by another recipe. Pass --fresh to retrain")


register("moe_lora", MoeLoraParams, prepare=prepare, export=export, load_export=load_export, aux_loss=aux_loss,
         batch_stats=batch_stats, before_forward=before_forward)
