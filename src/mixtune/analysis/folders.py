"""The analyses of :mod:`mixtune.analysis` over model folders, one tensor at a time (safetensors read
as stored, as the merge engine does), so a model larger than memory can be analysed.

Both functions take full model folders (a LoRA adapter: write its ``merged/`` model first, e.g.
``train.method.merge: true``); tensors are matched by name, and only those present in every
folder with one shape are compared.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, closing
from pathlib import Path

import torch

from mixtune.analysis.intruders import intruder_dimensions
from mixtune.core import CheckpointError
from mixtune.core.names import layer_index
from mixtune.merge.io import CheckpointReader

FLOATS = {"F16", "BF16", "F32", "F64"}


def _shared(readers: list[CheckpointReader]) -> list[str]:
    first = readers[0]
    names = [k for k in first.keys() if first.dtype(k) in FLOATS
             and all(k in r and r.shape(k) == first.shape(k) for r in readers[1:])]
    if not names:
        raise CheckpointError(f"{', '.join(r.label for r in readers)}: no floating-point tensor of one name and "
                              "shape in every folder; are they fine-tunes of one base?")
    return names


def module_kind(name: str) -> str:
    """The matrix's module, for grouping: the parameter name's last module (``q_proj``, ``down_proj``, ``c_attn``)."""
    parts = name.removesuffix(".weight").split(".")
    return parts[-1]


def intruder_table(base: str | Path, tuned: str | Path, *, k: int = 10, eps: tuple[float, ...] = (0.5,),
                   side: str = "left", embeddings: bool = False) -> list[dict]:
    """Per 2-D weight matrix of ``tuned`` (HF ``[out, in]``) that ``base`` also has: its block
    (``layer_index``; None outside the blocks), module, and intruder count at each ``eps``
    (:func:`~mixtune.analysis.intruders.intruder_dimensions`, top-``k``). Embedding and output
    matrices (vocabulary-sized) are left out unless ``embeddings``."""
    with ExitStack() as stack:
        readers = [stack.enter_context(closing(CheckpointReader(f))) for f in (base, tuned)]
        rows = []
        for name in _shared(readers):
            if len(readers[0].shape(name)) != 2:
                continue
            if not embeddings and ("embed" in name or "lm_head" in name or name.endswith("wte.weight")):
                continue
            found = intruder_dimensions(readers[0].get(name), readers[1].get(name), k=k, eps=max(eps), side=side)
            rows.append({"name": name, "layer": layer_index(name), "module": module_kind(name),
                         "intruders": {str(e): found.count(e) for e in eps}})
        return rows


def task_vector_table(base: str | Path, models: list[str | Path]) -> dict:
    """Task vectors tau_i = theta_i - theta_0 of ``models`` over ``base``, streamed: the pairwise
    whole-model cosines (:func:`~mixtune.analysis.geometry.cosine`, accumulated tensor by tensor:
    <tau_i, tau_j> and |tau_i|^2 summed in float64) and each task vector's L2 norm per block
    (:func:`~mixtune.analysis.geometry.layer_norms`)."""
    if len(models) < 1:
        raise ValueError("task_vector_table needs at least one fine-tuned model")
    n = len(models)
    dots = torch.zeros(n, n, dtype=torch.float64)
    blocks: list[dict[str, float]] = [{} for _ in models]
    with ExitStack() as stack:
        readers = [stack.enter_context(closing(CheckpointReader(f))) for f in (base, *models)]
        for name in _shared(readers):
            base_t = readers[0].get(name).to(torch.float64).flatten()
            taus = torch.stack([r.get(name).to(torch.float64).flatten() - base_t for r in readers[1:]])
            dots += taus @ taus.T
            i = layer_index(name)
            key = "other" if i is None else str(i)
            for m, sq in enumerate(taus.pow(2).sum(1).tolist()):
                blocks[m][key] = blocks[m].get(key, 0.0) + sq
    norms = dots.diagonal().sqrt()
    cos = torch.where(torch.outer(norms, norms) > 0, dots / torch.outer(norms, norms).clamp(min=1e-300), 0.0)
    order = sorted({k for b in blocks for k in b if k != "other"}, key=int) + ["other"]
    return {"models": [str(m) for m in models], "cosine": cos.tolist(), "norm": norms.tolist(),
            "layer_norms": [{k: math.sqrt(b[k]) for k in order if k in b} for b in blocks]}
