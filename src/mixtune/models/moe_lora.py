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

from mixtune.core import CheckpointError, ConfigError
from mixtune.models.structure import GatedFFN, find_structure, gated_ffn

CONFIG, WEIGHTS = "moe_lora.json", "moe_lora.safetensors"


def _lora_pair(n_in: int, n_out: int, r: int, experts: int | None = None):
    """A (Kaiming-uniform, as peft) and B (zeros) for one LoRA, or stacked for ``experts``."""
    shape_a, shape_b = ((experts,) if experts else ()) + (r, n_in), ((experts,) if experts else ()) + (n_out, r)
    a = torch.empty(shape_a)
    for m in a.view(-1, r, n_in):
        torch.nn.init.kaiming_uniform_(m, a=math.sqrt(5))
    return torch.nn.Parameter(a), torch.nn.Parameter(torch.zeros(shape_b))


def _lora(x, a, b, scale: float, like: torch.Tensor):
    """(scale) B A x in the adapter's dtype, returned in the dtype of ``like`` (what it is added to): fp32
    adapters on a bf16 base train without autocast too, as peft's do (casts are no-ops under autocast)."""
    return (scale * F.linear(F.linear(x.to(a.dtype), a), b)).to(like.dtype)


class LoraLinear(torch.nn.Module):
    """A frozen linear layer plus (alpha / r) B A x; keeps the layer's own ``weight``/``bias`` names."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.weight, self.bias, self.scale = base.weight, base.bias, alpha / r
        self.lora_A, self.lora_B = _lora_pair(base.in_features, base.out_features, r)

    def forward(self, x):
        base = F.linear(x, self.weight, self.bias)
        return base + _lora(x, self.lora_A, self.lora_B, self.scale, base)


class MoeLoraMLP(torch.nn.Module):
    """A gated FFN, down(act(gate x) * up x), turned into a mixture of LoRA experts. The frozen
    projections keep their attribute names (``gate_proj``, ``up_proj``, ``down_proj``, or Phi-3's
    fused ``gate_up_proj``), so the base's weights keep their keys; ``names`` says which is which
    (default: Llama's)."""

    def __init__(self, mlp, p, names: GatedFFN | None = None) -> None:
        super().__init__()
        self.names = n = names or GatedFFN("mlp", "down_proj", "act_fn", gate="gate_proj", up="up_proj")
        for attr in (n.gate, n.up, n.gate_up, n.down):
            if attr is not None:
                setattr(self, attr, getattr(mlp, attr))
        self.act_fn = getattr(mlp, n.act)
        down = getattr(self, n.down)
        hidden, inter = down.out_features, down.in_features
        self.top_k, self.experts, self.scale = min(p.top_k, p.experts), p.experts, p.alpha / p.r
        self.router = torch.nn.Linear(hidden, p.experts, bias=False)
        torch.nn.init.normal_(self.router.weight, std=p.router_init_range)
        self.gate_A, self.gate_B = _lora_pair(hidden, inter, p.r, p.experts)
        self.up_A, self.up_B = _lora_pair(hidden, inter, p.r, p.experts)
        self.down_A, self.down_B = _lora_pair(inter, hidden, p.r, p.experts)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (router probabilities, top-k experts)

    def base_gate_up(self, x):
        """The frozen gate and up projections of ``x``, shared by every expert."""
        n = self.names
        if n.gate_up is not None:
            return getattr(self, n.gate_up)(x).chunk(2, dim=-1)  # Phi-3: gate rows first, then up
        return getattr(self, n.gate)(x), getattr(self, n.up)(x)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(x.to(self.router.weight.dtype)).float(), dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        mix = (top_p / top_p.sum(-1, keepdim=True)).to(x.dtype)
        self.last = (probs, top_i)
        base_gate, base_up = self.base_gate_up(x)
        down = getattr(self, self.names.down)
        out = torch.zeros_like(x)
        s = self.scale
        for e in range(self.experts):
            rows, slot = (top_i == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            xe = x[rows]
            g, u = base_gate[rows], base_up[rows]
            g = g + _lora(xe, self.gate_A[e], self.gate_B[e], s, g)
            u = u + _lora(xe, self.up_A[e], self.up_B[e], s, u)
            h = self.act_fn(g) * u
            y = down(h)
            y = y + _lora(h, self.down_A[e], self.down_B[e], s, y)
            out.index_add_(0, rows, y * mix[rows, slot].unsqueeze(-1))
        return out.reshape(shape)


def _check_same_function(block, mlp, moe: MoeLoraMLP) -> None:
    """With every B = 0 the mixture computes the FFN it replaces (the mixing weights sum to 1); any
    other result means the FFN is not down(act(gate x) * up x) as read from its structure."""
    w = moe.router.weight
    base = getattr(moe, moe.names.down).weight.dtype
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.device, base)
    low = base != w.dtype  # a bf16/fp16 base: compare under autocast, as it trains, at that precision
    with torch.no_grad(), torch.autocast(w.device.type, dtype=base, enabled=low):
        want, got = mlp(x).float(), moe(x).float()
    moe.last = None
    if not torch.allclose(want, got, rtol=1e-2 if low else 1e-3, atol=1e-2 if low else 1e-4):
        raise ConfigError(f"moe_lora: {type(mlp).__name__} in {block.kind} ({block.name}) does not compute "
                          "down(act(gate x) * up x) from the projections found; a gated FFN is expected")


def attach(model, p):
    """Turn every block's FFN into a mixture of LoRA experts (and add the attention LoRAs); only
    they train. ``p`` has experts, top_k, r, alpha, router_init_range and attention. A model that
    has them already (a later stage) keeps and trains its own. Blocks, their gated FFN and the
    matrices ``p.attention`` names (paths relative to the block, or their last parts) come from
    :func:`mixtune.models.structure.find_structure`; every block is checked before any changes.

    Raises:
        ConfigError: the model has no decoder blocks, a block's FFN is not gated (the message names
            the block and its FFN matrices), or an attention name matches no nn.Linear of a block.
    """
    if moe_modules(model):
        for name, param in model.named_parameters():
            param.requires_grad_(is_added(name))
        return model
    plans = []
    for block in find_structure(model, "moe_lora").blocks:
        attention = [block.find(n, "attention", "moe_lora: train.method.attention") for n in p.attention]
        if len({id(m) for m in attention}) < len(attention):
            raise ConfigError(f"moe_lora: train.method.attention {p.attention} names one matrix of {block.kind} twice")
        for m in attention:
            if m.conv1d:
                raise ConfigError(f"moe_lora: train.method.attention {m.path} in {block.kind} is a Conv1D; "
                                  "expected an nn.Linear")
        plans.append((block, gated_ffn(block, "moe_lora"), attention))
    built = []  # initialised block by block, FFN then attention, in the order of earlier versions
    for block, names, attention in plans:
        mlp = getattr(block.module, names.attr)
        moe = MoeLoraMLP(mlp, p, names).to(mlp.get_submodule(names.down).weight.device)
        _check_same_function(block, mlp, moe)
        built.append((block, names.attr, moe, [(m, LoraLinear(m.module, p.r, p.alpha).to(m.module.weight.device))
                                               for m in attention]))
    for param in model.parameters():
        param.requires_grad_(False)
    for block, attr, moe, loras in built:
        setattr(block.module, attr, moe)
        for m, lora in loras:
            parent, _, leaf = m.path.rpartition(".")
            setattr(block.module.get_submodule(parent) if parent else block.module, leaf, lora)
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


