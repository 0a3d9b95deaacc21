"""bench/merge_vs_mergekit.py's machinery: synthetic Llama-shaped checkpoints, the byte ranges a merge
reads (from the safetensors headers), the I/O floor over them, and two merged folders compared tensor
by tensor. It reads files only; neither tool is imported here.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file


@dataclass(frozen=True)
class Dims:
    hidden: int
    inter: int
    vocab: int
    heads: int
    layers: int


def dims_for(params: float, hidden: int, vocab: int) -> Dims:
    """The Llama shape nearest ``params`` parameters at this width: TinyLlama's proportions
    (intermediate 2.75 x hidden, heads of 128), as many layers as fit after the embedding and head."""
    inter, heads = hidden * 11 // 4, max(1, hidden // 128)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden - hidden) / per_layer))
    return Dims(hidden, inter, vocab, heads, layers)


def shapes(d: Dims) -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (d.vocab, d.hidden))]
    for i in range(d.layers):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{n}_proj.weight", (d.hidden, d.hidden)) for n in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (d.inter, d.hidden)), (p + "mlp.up_proj.weight", (d.inter, d.hidden)),
                (p + "mlp.down_proj.weight", (d.hidden, d.inter)), (p + "input_layernorm.weight", (d.hidden,)),
                (p + "post_attention_layernorm.weight", (d.hidden,))]
    return out + [("model.norm.weight", (d.hidden,)), ("lm_head.weight", (d.vocab, d.hidden))]


def n_params(d: Dims) -> int:
    return sum(math.prod(s) for _, s in shapes(d))


def write_checkpoint(folder: Path, d: Dims, seed: int, base_seed: int | None, shard_bytes: int) -> None:
    """A bf16 checkpoint in Hugging Face's sharded layout: N(0, 0.02) weights, or, for a fine-tune
    (``base_seed`` given), the base's weights plus N(0, 0.002) noise."""
    folder.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d.hidden,
              "intermediate_size": d.inter, "num_hidden_layers": d.layers, "num_attention_heads": d.heads,
              "num_key_value_heads": d.heads, "vocab_size": d.vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    g_base = torch.Generator().manual_seed(base_seed if base_seed is not None else seed)
    g_ft = torch.Generator().manual_seed(seed)
    shard, size, shards = {}, 0, []
    for name, shape in shapes(d):
        t = torch.randn(shape, generator=g_base) * 0.02
        if base_seed is not None:
            t += torch.randn(shape, generator=g_ft) * 0.002
        t = t.to(torch.bfloat16)
        if shard and size + t.numel() * 2 > shard_bytes:
            shards.append(shard)
            shard, size = {}, 0
        shard[name] = t
        size += t.numel() * 2
    shards.append(shard)
    weight_map = {}
    for i, s in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(s, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in s})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def tensor_index(folder: Path) -> dict[str, tuple[Path, int, int]]:
    """Each tensor of a checkpoint folder: its file and the byte range [start, end) of its data,
    from the safetensors header (8 bytes of header length, then the JSON header)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                out[name] = (f, 8 + n + start, 8 + n + end)
    return out


LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to (None for the embedding, final norm and head)."""
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


Reads = list[tuple[Path, Callable[[str], bool]]]
"""What a merge reads: for each input folder, which of its tensors."""


def ranges_read(reads: Reads) -> dict[Path, list[tuple[int, int]]]:
    """The byte ranges of the tensors ``reads`` takes, per file, sorted and with touching ranges joined."""
    per_file: dict[Path, list[tuple[int, int]]] = {}
    for folder, keep in reads:
        for name, (f, start, end) in tensor_index(folder).items():
            if keep(name):
                per_file.setdefault(f, []).append((start, end))
    for f, spans in per_file.items():
        spans.sort()
        joined = [spans[0]]
        for start, end in spans[1:]:
            if start <= joined[-1][1]:
                joined[-1] = (joined[-1][0], max(end, joined[-1][1]))
            else:
                joined.append((start, end))
        per_file[f] = joined
    return per_file


def io_floor(ranges: dict[Path, list[tuple[int, int]]], out_bytes: int, scratch: Path) -> float:
    """Seconds to read each byte range once, 64 MiB at a time, and write ``out_bytes`` to ``scratch``:
    the least any tool must spend to read what the merge reads and write what it writes."""
    buf = bytearray(64 * 2**20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for f, spans in ranges.items():
        with open(f, "rb", buffering=0) as fh:
            for start, end in spans:
                fh.seek(start)
                left = end - start
                while left > 0:
                    got = fh.readinto(view[:min(left, len(buf))])
                    if not got:
                        break
                    left -= got
    with open(scratch, "wb") as fh:
        left = out_bytes
        while left > 0:
            n = min(left, len(buf))
            fh.write(view[:n])
            left -= n
    seconds = time.perf_counter() - t0
    scratch.unlink()
    return seconds


def span_bytes(ranges: dict[Path, list[tuple[int, int]]]) -> int:
    return sum(end - start for spans in ranges.values() for start, end in spans)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _get(index: dict[str, tuple[Path, int, int]], name: str) -> torch.Tensor:
    with safe_open(str(index[name][0]), framework="pt") as fh:
        return fh.get_tensor(name)


def compare(theirs: Path, ours: Path, base: Path | None, layers: int | None, exact: bool) -> tuple[bool, str]:
    """mergekit's output folder against mixtune's, one tensor at a time: the same ``num_hidden_layers``
    (``layers`` if given), tensor names, shapes and dtypes; then every tensor equal (``exact``), or, for
    the random methods, the same statistics of the change from ``base`` over the matrices: the share of
    entries left at the base (within 0.02) and the summed |change| (within 5%)."""
    n_theirs = json.loads((theirs / "config.json").read_text())["num_hidden_layers"]
    n_ours = json.loads((ours / "config.json").read_text())["num_hidden_layers"]
    if n_theirs != n_ours or (layers is not None and n_ours != layers):
        return False, f"num_hidden_layers: mergekit {n_theirs}, mixtune {n_ours}, expected {layers}"
    it, io = tensor_index(theirs), tensor_index(ours)
    if set(it) != set(io):
        return False, f"tensors only in mergekit's: {sorted(set(it) - set(io))[:3]}, only in mixtune's: " \
                      f"{sorted(set(io) - set(it))[:3]}"
    ib = tensor_index(base) if base is not None else {}
    zeros, l1, count = [0, 0], [0.0, 0.0], 0
    for name in sorted(it):
        a, b = _get(it, name), _get(io, name)
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, f"{name}: mergekit {a.dtype} {tuple(a.shape)}, mixtune {b.dtype} {tuple(b.shape)}"
        if exact:
            if not torch.equal(a, b):
                return False, f"{name} differs by up to {(a.float() - b.float()).abs().max().item():.3g}"
        elif a.dim() == 2:
            w = _get(ib, name).float()
            for k, t in enumerate((a, b)):
                delta = t.float() - w
                zeros[k] += int((delta == 0).sum())
                l1[k] += float(delta.abs().sum())
            count += a.numel()
    if exact:
        return True, f"{len(it)} tensors equal"
    z = [n / count for n in zeros]
    ok = abs(z[0] - z[1]) < 0.02 and abs(l1[0] - l1[1]) <= 0.05 * l1[0]
    return ok, f"left at base {z[0]:.3f} / {z[1]:.3f}, sum |change| {l1[0]:.4g} / {l1[1]:.4g}"
