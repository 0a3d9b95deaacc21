"""Where a causal LM's decoder blocks are and which matrices in each are attention or FFN, read from
the module tree, not from parameter names.

Blocks are the ``nn.ModuleList`` of identical modules that transformers' own metadata points to: its
class is in the model's ``_no_split_modules`` (the unit transformers never splits across devices)
and it lies under ``get_decoder()`` / ``base_model_prefix``; without that metadata, the largest such
list wins. A block's matrices are its ``nn.Linear`` and ``transformers.pytorch_utils.Conv1D``
layers (GPT-2 stores its weights transposed, in ``Conv1D``), each named by its path **relative to
the block**, so GPT-2's ``attn.c_proj`` and ``mlp.c_proj`` are two matrices. A matrix is
attention when a module between it and the block is an attention module (class name containing
``Attention``, or an ``attn``/``attention`` attribute); every other block matrix is FFN (the
``mlp`` of Llama, Phi, GPT-2 and NeoX, OPT's ``fc1``/``fc2`` sitting on the block itself, an MoE's
router and experts). Fused projections are recognised by their transformers names and carry the
parts they hold (``qkv_proj``, ``c_attn``, ``query_key_value``: q, k, v; ``gate_up_proj``: gate, up).
Imports only ``core``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mixtune.core import ConfigError

FUSED: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q", "k", "v"),  # Phi-3
    "c_attn": ("q", "k", "v"),  # GPT-2 (Conv1D: q, k, v side by side in its output columns)
    "query_key_value": ("q", "k", "v"),  # GPT-NeoX, Falcon, Bloom (interleaved per head)
    "Wqkv": ("q", "k", "v"),  # MPT, Phi-1 remote code
    "qkv": ("q", "k", "v"),
    "kv_proj": ("k", "v"),
    "gate_up_proj": ("gate", "up"),  # Phi-3 (gate rows first, then up)
}
"""Names of fused projections (the last part of the module path) and the matrices they stack."""

ATTENTION_ATTRS = ("attn", "attention")


def matrix_types() -> tuple[type, ...]:
    """The layer types that are matrices: ``nn.Linear`` and transformers' ``Conv1D``."""
    from transformers.pytorch_utils import Conv1D

    return torch.nn.Linear, Conv1D


@dataclass(frozen=True, eq=False)
class Matrix:
    """One weight matrix of a block (with its bias, if any)."""

    path: str
    """Module path relative to the block: ``self_attn.q_proj``, ``attn.c_proj``, ``mlp.c_proj``."""
    name: str
    """Full module name in the model: ``model.layers.0.self_attn.q_proj``."""
    module: torch.nn.Module
    role: Literal["attention", "ffn"]
    fused: tuple[str, ...] = ()
    """The projections a fused matrix stacks (``("q", "k", "v")``), empty for a plain one."""

    @property
    def leaf(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def conv1d(self) -> bool:
        """Stored as (in, out) (transformers' ``Conv1D``), not (out, in) as ``nn.Linear``."""
        return not isinstance(self.module, torch.nn.Linear)

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features), whichever way the weight is stored."""
        rows, cols = self.module.weight.shape
        return (cols, rows) if self.conv1d else (rows, cols)

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        """The weight and bias by their full parameter names."""
        return {f"{self.name}.{k}": p for k, p in self.module.named_parameters(recurse=False)}

    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters().values())


@dataclass(frozen=True, eq=False)
class Block:
    """One decoder block and its matrices, in module order."""

    index: int
    name: str
    module: torch.nn.Module
    matrices: tuple[Matrix, ...]

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    @property
    def attention(self) -> tuple[Matrix, ...]:
        return tuple(m for m in self.matrices if m.role == "attention")

    @property
    def ffn(self) -> tuple[Matrix, ...]:
        return tuple(m for m in self.matrices if m.role == "ffn")

    def find(self, name: str, role: Literal["attention", "ffn"], where: str) -> Matrix:
        """The matrix a user names: its block-relative path or a suffix of it (``q_proj``,
        ``attn.c_proj``), looked up among the block's ``role`` matrices first, then among all.

        Raises:
            ConfigError: nothing matches, or several matrices do (``c_proj`` in a GPT-2 block when
                neither or both of its matches have that role).
        """
        def hits(ms):
            return [m for m in ms if m.path == name or m.path.endswith("." + name)]

        found = hits(getattr(self, role)) or hits(self.matrices)
        if len(found) == 1:
            return found[0]
        paths = ", ".join(m.path for m in (found or self.matrices))
        if found:
            raise ConfigError(f"{where}: {name!r} matches {len(found)} matrices of {self.kind} ({paths}); "
                              "write its path relative to the block")
        raise ConfigError(f"{where}: {self.kind} ({self.name}) has no matrix {name!r}; its matrices are {paths}")


@dataclass(frozen=True, eq=False)
class Structure:
    """A model's decoder blocks."""

    container: str
    """Full name of the ModuleList that holds the blocks (``model.layers``, ``transformer.h``)."""
    blocks: tuple[Block, ...]

    @property
    def kind(self) -> str:
        return self.blocks[0].kind

    def matrices(self) -> list[Matrix]:
        return [m for b in self.blocks for m in b.matrices]


def _no_split(model) -> set[str]:
    """Class names transformers never splits (``_no_split_modules``) of the model and its submodels."""
    out: set[str] = set()
    for m in model.modules():
        out |= set(getattr(m, "_no_split_modules", None) or ())
    return out


def _decoder_name(model, names: dict[int, str]) -> str | None:
    """Full name of ``model.get_decoder()`` (None when the model has none or it is the model)."""
    try:
        dec = model.get_decoder()
    except Exception:  # noqa: BLE001  (models without one raise anything from AttributeError to NotImplementedError)
        return None
    return names.get(id(dec))


def _is_attention(name: str, module: torch.nn.Module) -> bool:
    last = name.rsplit(".", 1)[-1].lower()
    return "attention" in type(module).__name__.lower() or any(a in last for a in ATTENTION_ATTRS)


def _block(index: int, name: str, module: torch.nn.Module) -> Block:
    kinds = matrix_types()
    mods = dict(module.named_modules())
    matrices = []
    for path, sub in mods.items():
        if not path or not isinstance(sub, kinds):
            continue
        parts = path.split(".")
        above = [".".join(parts[:i]) for i in range(1, len(parts))]  # the modules between block and matrix
        role = "attention" if any(_is_attention(a, mods[a]) for a in above) else "ffn"
        matrices.append(Matrix(path, f"{name}.{path}", sub, role, FUSED.get(parts[-1], ())))
    return Block(index, name, module, tuple(matrices))


def find_structure(model, method: str = "model") -> Structure:
    """The decoder blocks of ``model`` and each block's attention and FFN matrices.

    Args:
        model: a transformers causal LM (or any ``nn.Module`` with a list of identical blocks).
        method: who asks, for the error message (``hft``, ``lift``, ``moe_lora``).

    Raises:
        ConfigError: no ``nn.ModuleList`` of identical blocks holding linear layers.
    """
    kinds = matrix_types()
    names = {id(m): n for n, m in model.named_modules()}
    no_split = _no_split(model)
    decoder = _decoder_name(model, names)
    prefix = getattr(model, "base_model_prefix", "") or ""
    best, best_key = None, None
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
            continue
        classes = {type(b) for b in mod}
        if len(classes) != 1 or not any(isinstance(s, kinds) for s in mod[0].modules()):
            continue
        key = (type(mod[0]).__name__ in no_split,
               decoder is not None and (decoder == "" or name.startswith(decoder + ".")),
               bool(prefix) and name.startswith(prefix + "."),
               sum(p.numel() for p in mod.parameters()))
        if best_key is None or key > best_key:
            best, best_key = (name, mod), key
    if best is None:
        raise ConfigError(f"{method}: {type(model).__name__} has no decoder blocks (expected an nn.ModuleList of "
                          "identical blocks holding nn.Linear or Conv1D layers, such as model.layers)")
    name, mod = best
    return Structure(name, tuple(_block(i, f"{name}.{i}", b) for i, b in enumerate(mod)))


@dataclass(frozen=True)
class GatedFFN:
    """A block's gated FFN, down(act(gate(x)) * up(x)), by its modules' attribute names."""

    attr: str
    """The FFN module's attribute on the block (``mlp``)."""
    down: str
    act: str
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None
    """A fused projection whose output halves are gate, then up (Phi-3's ``gate_up_proj``)."""


def gated_ffn(block: Block, method: str) -> GatedFFN:
    """The gated FFN of ``block``: one module directly on the block holding either gate, up and down
    projections (two hidden -> inner, one inner -> hidden; gate and up told apart by their names) or a
    fused gate_up and a down projection, all ``nn.Linear``, and an activation attribute.

    Raises:
        ConfigError: the FFN is not gated (Phi-2's fc1/fc2, GPT-2's c_fc/c_proj), not in one module,
            or not made of ``nn.Linear``; the message names the block and the FFN's matrices.
    """
    ffn = block.ffn
    paths = ", ".join(m.path for m in ffn) or "none"
    where = f"{method}: {block.kind} ({block.name}) FFN matrices {paths}"
    parents = {m.path.rsplit(".", 1)[0] if "." in m.path else "" for m in ffn}
    if len(parents) != 1 or "" in parents or "." in next(iter(parents)):
        raise ConfigError(f"{where}: expected a gated FFN module (gate, up and down projections) directly on the block")
    attr = parents.pop()
    if any(m.conv1d for m in ffn):
        raise ConfigError(f"{where}: expected nn.Linear layers, found Conv1D (a GPT-2-style MLP, not a gated FFN)")
    mlp = getattr(block.module, attr)
    act = next((a for a in ("act_fn", "activation_fn", "act") if callable(getattr(mlp, a, None))), None)
    fused = [m for m in ffn if m.fused == ("gate", "up")]
    plain = [m for m in ffn if not m.fused]
    if fused and len(ffn) == 2 and len(plain) == 1 and act:
        (gu,), (down,) = fused, plain
        if gu.shape[0] == 2 * down.shape[1] and gu.shape[1] == down.shape[0]:
            return GatedFFN(attr, down.leaf, act, gate_up=gu.leaf)
    if len(ffn) == 3 and not fused and act:
        gate = [m for m in ffn if "gate" in m.leaf or m.leaf == "w1"]
        up = [m for m in ffn if "up" in m.leaf or m.leaf == "w3"]
        rest = [m for m in ffn if m not in gate + up]
        if len(gate) == len(up) == len(rest) == 1:
            (g,), (u,), (d,) = gate, up, rest
            if g.shape == u.shape == (d.shape[1], d.shape[0]):
                return GatedFFN(attr, d.leaf, act, gate=g.leaf, up=u.leaf)
    raise ConfigError(f"{where}: not a gated FFN; expected gate, up and down projections (Llama-style) or a fused "
                      f"gate_up_proj and down_proj, with an act_fn")
