"""A mixture of LoRA experts in every feed-forward block (MixLoRA), as modules and on disk.

Each block's gated FFN becomes E experts that share its frozen gate, up and down projections and
each add their own LoRA to all three; a linear router (no bias) picks the top-k experts per token
and their outputs are mixed by the renormalised router probabilities. Attention projections can
take a plain LoRA as well. On disk: ``moe_lora.safetensors`` and ``moe_lora.json`` (which names the
base folder, as a peft adapter's config does), beside the base's files or alone in a stage folder;
:func:`mixtune.models.load_model` (base folder with experts) and :func:`mixtune.eval.load_for_eval`
(experts alone) rebuild the mixture. Training (the router's loss, routing counts) is ``train.methods.moe_lora``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mixtune.core import CheckpointError

CONFIG, WEIGHTS = "moe_lora.json", "moe_lora.safetensors"


def _lora_pair(n_in: int, n_out: int, r: int, experts: int | None = None):
    """A (Kaiming-uniform, as peft) and B (zeros) for one LoRA, or stacked for ``experts``."""
    shape_a, shape_b = ((experts,) if experts else ()) + (r, n_in), ((experts,) if experts else ()) + (n_out, r)
    a = torch.empty(shape_a)
    for m in a.view(-1, r, n_in):
        torch.nn.init.kaiming_uniform_(m, a=math.sqrt(5))
    return torch.nn.Parameter(a), torch.nn.Parameter(torch.zeros(shape_b))


class LoraLinear(torch.nn.Module):
    """A frozen linear layer plus (alpha / r) B A x; keeps the layer's own ``weight``/``bias`` names."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.weight, self.bias, self.scale = base.weight, base.bias, alpha / r
        self.lora_A, self.lora_B = _lora_pair(base.in_features, base.out_features, r)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


class MoeLoraMLP(torch.nn.Module):
    """A gated FFN (gate, up, down projections) turned into a mixture of LoRA experts."""

    def __init__(self, mlp, p) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        hidden, inter = self.gate_proj.in_features, self.gate_proj.out_features
        self.top_k, self.experts, self.scale = min(p.top_k, p.experts), p.experts, p.alpha / p.r
        self.router = torch.nn.Linear(hidden, p.experts, bias=False)
        torch.nn.init.normal_(self.router.weight, std=p.router_init_range)
        self.gate_A, self.gate_B = _lora_pair(hidden, inter, p.r, p.experts)
        self.up_A, self.up_B = _lora_pair(hidden, inter, p.r, p.experts)
        self.down_A, self.down_B = _lora_pair(inter, hidden, p.r, p.experts)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (router probabilities, top-k experts)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(x).float(), dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        mix = (top_p / top_p.sum(-1, keepdim=True)).to(x.dtype)
        self.last = (probs, top_i)
        base_gate, base_up = self.gate_proj(x), self.up_proj(x)  # shared by every expert
        out = torch.zeros_like(x)
        s = self.scale
        for e in range(self.experts):
            rows, slot = (top_i == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            xe = x[rows]
            g = base_gate[rows] + s * F.linear(F.linear(xe, self.gate_A[e]), self.gate_B[e])
            u = base_up[rows] + s * F.linear(F.linear(xe, self.up_A[e]), self.up_B[e])
            h = self.act_fn(g) * u
            y = self.down_proj(h) + s * F.linear(F.linear(h, self.down_A[e]), self.down_B[e])
            out.index_add_(0, rows, y * mix[rows, slot].unsqueeze(-1))
        return out.reshape(shape)


def _blocks(model):
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise CheckpointError("moe_lora: the model has no `model.layers` (a Llama-style decoder is expected)")
    return layers


def attach(model, p):
    """Turn every block's FFN into a mixture of LoRA experts (and add the attention LoRAs); only
    they train. ``p`` has experts, top_k, r, alpha, router_init_range and attention. A model that
    has them already (a later stage) keeps and trains its own."""
    if moe_modules(model):
        for name, param in model.named_parameters():
            param.requires_grad_(is_added(name))
        return model
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in _blocks(model):
        mlp = layer.mlp
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            raise CheckpointError("moe_lora: a block's mlp has no gate_proj/up_proj/down_proj (a gated FFN is expected)")
        layer.mlp = MoeLoraMLP(mlp, p)
        for name in p.attention:
            if not isinstance(getattr(layer.self_attn, name, None), torch.nn.Linear):
                raise CheckpointError(f"moe_lora: attention has no linear {name!r} (train.method.attention)")
            setattr(layer.self_attn, name, LoraLinear(getattr(layer.self_attn, name), p.r, p.alpha))
    model.mixtune_moe_lora = p
    return model


def moe_modules(model) -> list[MoeLoraMLP]:
    return [m for m in model.modules() if isinstance(m, MoeLoraMLP)]


def is_added(key: str) -> bool:
    return any(part in key for part in (".router.", ".gate_A", ".gate_B", ".up_A", ".up_B", ".down_A", ".down_B",
                                        ".lora_A", ".lora_B"))


def save(model, spec: dict, out_dir: Path, state_dict: dict | None) -> None:
    """The base as a Hugging Face folder, the experts, routers and attention LoRAs beside it."""
    sd = state_dict if state_dict is not None else model.state_dict()
    model.save_pretrained(out_dir, state_dict={k: v for k, v in sd.items() if not is_added(k)})
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items() if is_added(k)}, str(Path(out_dir) / WEIGHTS))
    (Path(out_dir) / CONFIG).write_text(json.dumps(spec, indent=2))


def load_into(model, folder: Path):
    """Rebuild the mixture saved in ``folder`` on ``model`` (its base) and load its weights."""
    try:
        p = SimpleNamespace(**json.loads((folder / CONFIG).read_text()))
        weights = load_file(str(folder / WEIGHTS))
    except Exception as e:
        raise CheckpointError(f"{folder}: {CONFIG} / {WEIGHTS} unreadable ({e})") from None
    attach(model, p)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    absent = [k for k in missing if is_added(k)]
    if absent or unexpected:
        raise CheckpointError(f"{folder}: {WEIGHTS} does not fit the model (missing {absent[:3]}, "
                              f"unexpected {list(unexpected)[:3]})")
    for param in model.parameters():
        param.requires_grad_(True)
    return model


