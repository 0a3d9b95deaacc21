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
CHUNK = 1 << 22  # entries of a tensor processed at once (float64 products: 32 MB per model)


def _kth_magnitude(base: torch.Tensor, model: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim threshold of the flat task vector ``model - base`` (both 1-D, as stored): the
    (n - int(density n))-th smallest |tau| in float32, every entry at or above it kept
    (:func:`mixtune.merge.methods.trim_mask`, per tensor), found without holding |tau| whole
    (:func:`mixtune.merge.methods.kth_of`)."""
    from mixtune.merge.methods import kth_of, kth_smallest

    n = base.numel()
    if density >= 1 or n == 0:
        return torch.tensor(0.0)
    k = max(1, n - int(density * n))
    if n <= CHUNK:
        return kth_smallest((model.float() - base.float()).abs(), k)
    return kth_of(n, k, lambda at: (model[at].float() - base[at].float()).abs(), CHUNK)


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


def task_vector_table(base: str | Path, models: list[str | Path], *, density: float = 0.2) -> dict:
    """Task vectors tau_i = theta_i - theta_0 of ``models`` over ``base``, streamed tensor by tensor:

    - ``cosine``: pairwise whole-model cosines (:func:`~mixtune.analysis.geometry.cosine`, from
      <tau_i, tau_j> and |tau_i|^2 summed in float64), and ``layer_cosine``: the same per block
      (``"0"``, ``"1"``, ..., ``"other"``);
    - ``norm`` and ``layer_norms``: each task vector's L2 norm, whole and per block
      (:func:`~mixtune.analysis.geometry.layer_norms`);
    - ``sign_conflicts`` and ``jaccard``: pairwise, after trimming each tau to its top ``density``
      entries by magnitude **per tensor** (TIES' trim, Yadav et al., 2023, Sec. 3, taken per tensor
      as mergekit does so that no whole-model ranking is held in memory): the share of entries kept
      by both whose signs disagree (:func:`~mixtune.analysis.geometry.sign_conflicts` of the pair),
      and |A & B| / |A | B| of the kept masks (:func:`~mixtune.analysis.geometry.topk_jaccard`),
      both counted over every tensor. 0 (conflicts) and 1 (Jaccard) on the diagonal.
    """
    if len(models) < 1:
        raise ValueError("task_vector_table needs at least one fine-tuned model")
    n = len(models)
    dots = torch.zeros(n, n, dtype=torch.float64)
    layer_dots: dict[str, torch.Tensor] = {}
    shared = torch.zeros(n, n, dtype=torch.float64)
    conflicts = torch.zeros(n, n, dtype=torch.float64)
    union = torch.zeros(n, n, dtype=torch.float64)
    with ExitStack() as stack:
        readers = [stack.enter_context(closing(CheckpointReader(f))) for f in (base, *models)]
        for name in _shared(readers):
            # one tensor at a time, as stored; the trim threshold from float32 |tau| (as the merge engine
            # computes it), the products from float64 chunks: never a whole tensor's task vector
            stored = [r.get(name).flatten() for r in readers]
            kth = [_kth_magnitude(stored[0], t, density) for t in stored[1:]]
            i = layer_index(name)
            key = "other" if i is None else str(i)
            d = torch.zeros(n, n, dtype=torch.float64)
            for start in range(0, stored[0].numel(), CHUNK):
                b = stored[0][start:start + CHUNK]
                t = torch.stack([m[start:start + CHUNK].float() - b.float() for m in stored[1:]])
                t64 = torch.stack([m[start:start + CHUNK].double() - b.double() for m in stored[1:]])
                d += t64 @ t64.T
                kept = torch.stack([(t[m].abs() >= kth[m]) & (t[m] != 0) for m in range(n)]).double()
                pos, neg = kept * (t > 0), kept * (t < 0)
                both = kept @ kept.T
                shared += both
                conflicts += both - pos @ pos.T - neg @ neg.T
                counts = kept.sum(1)
                union += counts[:, None] + counts[None, :] - both
            dots += d
            layer_dots[key] = layer_dots.get(key, torch.zeros(n, n, dtype=torch.float64)) + d
            del stored

    def cosines(m: torch.Tensor) -> list[list[float]]:
        norms = m.diagonal().sqrt()
        outer = torch.outer(norms, norms)
        return torch.where(outer > 0, m / outer.clamp(min=1e-300), 0.0).tolist()

    order = sorted((k for k in layer_dots if k != "other"), key=int) + (["other"] if "other" in layer_dots else [])
    return {"models": [str(m) for m in models], "density": density, "cosine": cosines(dots),
            "norm": dots.diagonal().sqrt().tolist(),
            "layer_cosine": {k: cosines(layer_dots[k]) for k in order},
            "layer_norms": [{k: math.sqrt(float(layer_dots[k][m, m])) for k in order} for m in range(n)],
            "sign_conflicts": torch.where(shared > 0, conflicts / shared.clamp(min=1), 0.0).fill_diagonal_(0).tolist(),
            "jaccard": torch.where(union > 0, shared / union.clamp(min=1), 1.0).fill_diagonal_(1).tolist()}


def mitigate_folder(base: str | Path, tuned: str | Path, out: str | Path, *, k: int = 10, eps: float = 0.5,
                    lam: float = 0.75, embeddings: bool = False) -> int:
    """Write to ``out`` the model of ``tuned`` with the intruders of every 2-D block matrix (as
    :func:`intruder_table` selects them) scaled by ``lam``
    (:func:`~mixtune.analysis.intruders.mitigate_intruders`; Shuttleworth et al., 2024, Sec. 6),
    every other tensor and file as they are; returns the number of matrices changed. The output is
    written whole or not at all, in one ``model.safetensors`` (held in memory: the model's size)."""
    import shutil

    from safetensors.torch import save_file

    from mixtune.analysis.intruders import mitigate_intruders
    from mixtune.core import atomic_dir

    tuned = Path(tuned)
    changed, state = 0, {}
    with ExitStack() as stack:
        readers = [stack.enter_context(closing(CheckpointReader(f))) for f in (base, tuned)]
        matrices = {name for name in _shared(readers) if len(readers[0].shape(name)) == 2
                    and (embeddings or not ("embed" in name or "lm_head" in name or name.endswith("wte.weight")))}
        for name in readers[1].keys():
            w = readers[1].get(name)
            if name in matrices:
                new = mitigate_intruders(readers[0].get(name), w, k=k, eps=eps, lam=lam)
                changed += int(not torch.equal(new, w))
                w = new
            state[name] = w.contiguous()
    with atomic_dir(out, overwrite=True) as tmp:
        for f in tuned.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
                shutil.copy2(f, tmp / f.name)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    return changed
