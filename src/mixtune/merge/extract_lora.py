"""LoRA extraction: a fine-tune's change to each linear layer as a peft LoRA adapter (what
``mergekit-extract-lora`` does).

For each weight W of the base and W' of the fine-tune the delta D = W' - W (float32) is split by
its SVD D = U S V^T, and the truncated SVD of rank k is saved as LoRA's B A (Hu et al., 2021,
arXiv:2106.09685, Eq. 3): A = sqrt(S_k) V_k^T, B = U_k sqrt(S_k) (or A = S_k V_k^T, B = U_k without
``distribute_scale``), with ``lora_alpha`` = r, so peft's scale alpha / r is 1 and
``PeftModel.from_pretrained(base, out)`` computes with W + B A. By the Eckart–Young–Mirsky theorem
(Eckart & Young, 1936, Psychometrika 1(3):211-218) this B A is the closest rank-k matrix to D, with
||D - B A||_F^2 = sum_{i>k} s_i^2. The rank is ``rank`` (mergekit's ``--max-rank``), the smallest k
keeping a fraction ``energy`` of sum s_i^2 (per tensor, so ranks differ by module: peft's
``rank_pattern`` / ``alpha_pattern``), or the count of singular values above ``sv_epsilon``; the
smallest of those given.

Which modules, as mergekit chooses them (``mergekit/scripts/extract_lora.py:391-466``): every
``nn.Linear``; embeddings and the output head are saved whole in ``modules_to_save`` unless
``embed_lora`` (embedding LoRA for ``nn.Embedding``, linear LoRA for the head); other modules with
weights (norms) are saved whole, or left out with ``skip_undecomposable``; ``include`` / ``exclude``
regexes (``re.search`` on the module name) choose among them. Unlike mergekit, a module whose
tensors are identical in both models, or whose rank comes out 0, is left out, so the adapter holds
only what the fine-tune changed, and ``target_modules`` lists full module names (peft's exact
match) rather than suffixes. A changed bias of a LoRA module is saved whole as
``base_layer.bias`` (``bias: lora_only``), which peft loads into the base layer as it is (mergekit
writes it as ``lora_B.bias`` without peft's ``lora_bias`` flag, ``extract_lora.py:511-527``, and
peft drops it). With tied embeddings the head gets the embedding's update too.

Tensors are read one at a time (:class:`~mixtune.merge.io.CheckpointReader`); A and B are appended
to a data file as they come and the safetensors file is assembled at the end, inside a temporary
folder renamed when complete (:func:`~mixtune.core.atomic_dir`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationError

from mixtune.core import CheckpointError, ConfigError, Strict, atomic_dir, atomic_write_text
from mixtune.merge.adapter import CONFIG, PREFIX, WEIGHTS
from mixtune.merge.io import DTYPES, ST_DTYPES, CheckpointReader
from mixtune.merge.run import VOCAB

REPORT = "extract_lora.json"


class ExtractConfig(Strict):
    """How a LoRA adapter is extracted from a fine-tune (``mixtune extract-lora``)."""

    rank: int | None = Field(None, gt=0)
    """Rank of every module (at most; mergekit's ``--max-rank``). With ``energy`` it caps the rank."""
    energy: float | None = Field(None, gt=0, le=1)
    """Fraction of each delta's sum of squared singular values to keep: each module gets the smallest
    rank that keeps it (1: every nonzero singular value)."""
    sv_epsilon: float = Field(0.0, ge=0)
    """Drop singular values at or below this (mergekit's ``--sv-epsilon``; 0: keep all)."""
    distribute_scale: bool = True
    """Split S as sqrt(S) into both A and B (mergekit's default); false: A = S V^T, B = U."""
    embed_lora: bool = False
    """LoRA for the embeddings (peft's embedding LoRA) and the output head instead of saving them whole."""
    modules_to_save: tuple[str, ...] = ()
    """Modules saved whole (full names or last components, e.g. ``lm_head``), as mergekit's ``--save-module``."""
    include: tuple[str, ...] = ()
    """Regexes (``re.search``): only modules whose name matches one are extracted (empty: all)."""
    exclude: tuple[str, ...] = ()
    """Regexes (``re.search``): modules whose name matches one are left out (kept as the base's)."""
    skip_undecomposable: bool = False
    """Leave out changed modules that are not linear or embeddings (norms) instead of saving them whole."""
    svd: Literal["full", "randomized"] = "full"
    """``full``: exact (torch.linalg.svd); ``randomized``: torch.svd_lowrank with ``rank`` + 10 columns
    and 4 power iterations (Halko et al., 2011, arXiv:0909.4061, Algs. 4.4 and 5.1), faster for a small
    rank of large matrices; needs ``rank`` and no ``energy``."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """dtype of the adapter's tensors (default: each base tensor's)."""
    device: str = "cpu"
    """Where the SVDs run (``cuda`` for a GPU)."""


def extract_config(**values) -> ExtractConfig:
    """An :class:`ExtractConfig` from keyword values; a bad value is one :class:`ConfigError` line."""
    try:
        cfg = ExtractConfig(**values)
    except ValidationError as e:
        problems = [f"{'.'.join(map(str, x['loc']))} = {x.get('input')!r}: {x['msg']}"
                    for x in e.errors(include_url=False)]
        raise ConfigError("extract-lora: " + "; ".join(problems)) from None
    if cfg.rank is None and cfg.energy is None and cfg.sv_epsilon == 0:
        raise ConfigError("extract-lora: give rank (e.g. --rank 32) or energy (e.g. --energy 0.9)")
    if cfg.svd == "randomized" and (cfg.rank is None or cfg.energy is not None):
        raise ConfigError("extract-lora: svd = randomized needs rank and no energy (a truncated SVD does not "
                          "see the whole spectrum that energy needs); use svd = full")
    return cfg


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest k with sum_{i<k} s_i^2 >= energy * sum_i s_i^2 (``s`` descending); 0 when s = 0.

    By Eckart–Young–Mirsky (Eckart & Young, 1936) the rank-k truncated SVD then leaves a relative
    squared Frobenius error of at most 1 - energy.
    """
    cum = torch.cumsum(s.double() ** 2, 0)
    if cum.numel() == 0 or cum[-1] == 0:
        return 0
    return min(int((cum < energy * cum[-1]).sum()) + 1, s.numel())


def decompose(delta: torch.Tensor, cfg: ExtractConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The truncated SVD of ``delta`` (m, n) as LoRA factors A (k, n), B (m, k), float32, with B A the
    best rank-k approximation of ``delta`` (Eckart & Young, 1936), and the fraction of sum s_i^2 kept.

    k is the smallest of ``cfg.rank``, :func:`energy_rank` at ``cfg.energy`` and the number of
    singular values above ``cfg.sv_epsilon`` (mergekit: ``extract_lora.py:232-255``, which splits
    sqrt(S) between A and B when ``distribute_scale``, else puts S in A); unlike mergekit, singular
    values that are exactly 0 are dropped even when ``sv_epsilon`` is 0.
    """
    d = delta.to(cfg.device, torch.float32)
    if cfg.svd == "randomized":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same factors every run
            u, s, v = torch.svd_lowrank(d, q=min(cfg.rank + 10, *d.shape), niter=4)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)  # (m, p), (p,), (p, n)
    # the energy to keep a fraction of: sum s_i^2 = ||D||_F^2 (the sum of the few computed ones would not do)
    total = float(s.double().square().sum()) if cfg.svd == "full" else float(d.double().square().sum())
    k = int((s > cfg.sv_epsilon).sum())  # never an exactly zero singular value, whatever the rank
    if cfg.rank is not None:
        k = min(k, cfg.rank)
    if cfg.energy is not None:
        k = min(k, energy_rank(s, cfg.energy))
    s, u, vh = s[:k], u[:, :k], vh[:k]
    if cfg.distribute_scale:
        root = s.sqrt()
        a, b = root[:, None] * vh, u * root[None, :]
    else:
        a, b = s[:, None] * vh, u
    kept = min(float(s.double().square().sum()) / total, 1.0) if total > 0 else 1.0
    return a.cpu(), b.cpu(), kept


class _AdapterWriter:
    """Appends tensors to a raw data file as they come (holding none), then writes the safetensors
    file: header first, then the data copied in one pass."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = open(folder / ".data.tmp", "wb")  # noqa: SIM115 - closed in finish
        self.header: dict = {"__metadata__": {"format": "pt"}}
        self.offset = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.data.write(memoryview(raw))
        self.header[key] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                            "data_offsets": [self.offset, self.offset + raw.nbytes]}
        self.offset += raw.nbytes

    def finish(self, name: str) -> None:
        self.data.close()
        text = json.dumps(self.header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(self.folder / name, "wb") as out, open(self.folder / ".data.tmp", "rb") as data:
            out.write(len(text).to_bytes(8, "little") + text)
            while chunk := data.read(1 << 24):
                out.write(chunk)
        os.unlink(self.folder / ".data.tmp")


@dataclass
class ExtractResult:
    """What was extracted: each LoRA module's rank and the fraction of its delta's energy kept, the
    modules saved whole, and the changed modules left out (by ``exclude`` / ``include`` /
    ``skip_undecomposable`` / rank 0)."""

    path: str
    ranks: dict[str, int] = field(default_factory=dict)
    kept: dict[str, float] = field(default_factory=dict)
    whole: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    unchanged: int = 0


def _config_json(folder: str | Path) -> dict:
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: no readable config.json ({e}); extraction needs the model's config") from None


def _modules(folder: Path, config: dict) -> tuple[dict[str, str], str | None, str | None]:
    """Each module of the model (built on the meta device) with a kind: linear, embedding or other;
    and the names of the input embedding and the output head."""
    import transformers
    from torch import nn

    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    try:
        cfg = transformers.AutoConfig.from_pretrained(folder)
        with torch.device("meta"):  # modules without memory: only their kinds and names are wanted
            model = cls._from_config(cfg) if cls is not None else transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # transformers raises many kinds for an architecture it cannot build
        raise CheckpointError(f"{folder}: transformers cannot build {arch or config.get('model_type')} ({e})") from None
    names = {id(m): n for n, m in model.named_modules()}
    emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    kinds = {n: "linear" if isinstance(m, nn.Linear) else "embedding" if isinstance(m, nn.Embedding) else "other"
             for n, m in model.named_modules()}
    return (kinds, names.get(id(emb_in)) if emb_in is not None else None,
            names.get(id(emb_out)) if emb_out is not None else None)


def _check(base: CheckpointReader, ft: CheckpointReader, base_cfg: dict, ft_cfg: dict) -> None:
    """Same architecture, tensor names and shapes; raises CheckpointError naming the first difference."""
    for key in ("model_type", "architectures"):
        if base_cfg.get(key) != ft_cfg.get(key):
            raise CheckpointError(f"{ft.label}: config.json {key} {ft_cfg.get(key)!r} differs from {base.label}'s "
                                  f"{base_cfg.get(key)!r}")
    for r, other in ((ft, base), (base, ft)):
        missing = [k for k in other.keys() if k not in r]
        if missing:
            raise CheckpointError(f"{r.label}: lacks tensor {missing[0]} that {other.label} has")
    for k in base.keys():
        a, b = base.shape(k), ft.shape(k)
        if a != b:
            hint = (f" (the vocabulary changed: resize the base's embeddings to {b[0]} rows, save it and "
                    "extract from that)") if a[1:] == b[1:] and VOCAB.search(k) else ""
            raise CheckpointError(f"{ft.label}: tensor {k} has shape {list(b)}, {base.label} has {list(a)}{hint}")


def extract_lora(base: str | os.PathLike, finetune: str | os.PathLike, out: str | os.PathLike,
                 cfg: ExtractConfig, *, overwrite: bool = False,
                 progress: Callable[[str, int], None] | None = None) -> ExtractResult:
    """Extract ``finetune`` - ``base`` as a peft LoRA adapter in ``out`` (written whole or not at all).

    Writes ``adapter_config.json``, ``adapter_model.safetensors`` and ``extract_lora.json`` (the
    config, and each module's rank and energy kept).

    Args:
        progress: optional callable given each module's name after it is done, and the number of modules.

    Raises:
        CheckpointError: the models differ in architecture, tensor names or shapes, hold NaN/Inf,
            or transformers cannot build the architecture; ``out`` exists without ``overwrite``.
    """
    if Path(out).exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another folder, or overwrite it (--overwrite)")
    base_cfg, ft_cfg = _config_json(base), _config_json(finetune)
    rb = CheckpointReader(base, label=f"base {base}")
    try:
        rf = CheckpointReader(finetune, label=f"fine-tune {finetune}")
    except CheckpointError:
        rb.close()
        raise
    try:
        _check(rb, rf, base_cfg, ft_cfg)
        kinds, emb_in, emb_out = _modules(Path(base), base_cfg)
        return _extract(rb, rf, Path(out), cfg, kinds, emb_in, emb_out, base, overwrite, progress)
    finally:
        rb.close()
        rf.close()


def _extract(rb, rf, out: Path, cfg: ExtractConfig, kinds: dict, emb_in: str | None, emb_out: str | None,
             base, overwrite: bool, progress) -> ExtractResult:
    # group the tensors by module: "model.layers.0.mlp.up_proj.weight" -> ("model.layers.0.mlp.up_proj", "weight")
    modules: dict[str, dict[str, str]] = {}
    for key in rb.keys():
        mod, _, param = key.rpartition(".")
        modules.setdefault(mod, {})[param] = key
    tied = emb_out is not None and emb_out not in modules and emb_in in modules
    result = ExtractResult(path=str(out))
    out_dtype = DTYPES[cfg.dtype] if cfg.dtype else None
    has_bias = False

    def read(r, key: str) -> torch.Tensor:
        t = r.get(key)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{r.label}: tensor {key} holds NaN or Inf")
        return t

    def wanted(name: str) -> bool:
        if cfg.include and not any(re.search(p, name) for p in cfg.include):
            return False
        return not any(re.search(p, name) for p in cfg.exclude)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = _AdapterWriter(tmp)

        def whole(mod: str, pairs: dict) -> None:
            for p, (_w0, w1) in pairs.items():
                writer.add(f"{PREFIX}{mod}.{p}", w1.to(out_dtype or w1.dtype))
            result.whole.append(mod)

        for mod, params in modules.items():
            pairs = {p: (read(rb, k), read(rf, k)) for p, k in params.items()}
            kind = kinds.get(mod)
            if all(torch.equal(a, b) for a, b in pairs.values()):
                result.unchanged += 1
            elif kind is None:
                raise CheckpointError(f"{rf.label}: tensor {next(iter(params.values()))} belongs to no module of "
                                      "the architecture transformers builds from config.json")
            elif mod in cfg.modules_to_save or mod.split(".")[-1] in cfg.modules_to_save:
                whole(mod, pairs)
            elif ((mod in (emb_in, emb_out) or kind == "embedding") and not cfg.embed_lora
                  and not any(re.search(p, mod) for p in cfg.exclude)):
                whole(mod, pairs)  # embeddings and the head are saved whole unless embed_lora, as mergekit
                if tied and mod == emb_in:
                    whole(emb_out, pairs)
            elif not wanted(mod) or (kind == "other" and cfg.skip_undecomposable):
                result.left_out.append(mod)
            elif kind == "other" or "weight" not in pairs:
                whole(mod, pairs)
            else:
                has_bias |= _lora(mod, kind, pairs, cfg, writer, result, emb_out if tied and mod == emb_in else None,
                                  out_dtype, whole)
            if progress is not None:
                progress(mod, len(modules))
        writer.finish(WEIGHTS)
        config = _peft_config(result, base, has_bias)
        atomic_write_text(tmp / CONFIG, json.dumps(config, indent=2))
        report = {"config": cfg.model_dump(mode="json"), **asdict(result)}
        report.pop("path")
        atomic_write_text(tmp / REPORT, json.dumps(report, indent=2))
    return result


def _lora(mod: str, kind: str, pairs: dict, cfg: ExtractConfig, writer: _AdapterWriter, result: ExtractResult,
          tied_head: str | None, out_dtype, whole) -> bool:
    """Write one module's LoRA pair (and a tied head's); returns whether a changed bias was saved."""
    w0, w1 = pairs["weight"]
    embedding = kind == "embedding"
    delta = w1.float() - w0.float()  # (out, in); an embedding's is (vocab, dim)
    a, b, kept = decompose(delta.T if embedding else delta, cfg)
    bias_changed = "bias" in pairs and not torch.equal(*pairs["bias"])
    if a.shape[0] == 0:  # nothing left at this rank / energy / epsilon
        if bias_changed:
            whole(mod, pairs)
        else:
            result.left_out.append(mod)
        return False
    dtype = out_dtype or w0.dtype
    if embedding:  # peft: delta = (B A)^T with A (r, vocab), B (dim, r)
        writer.add(f"{PREFIX}{mod}.lora_embedding_A", a.to(dtype))
        writer.add(f"{PREFIX}{mod}.lora_embedding_B", b.to(dtype))
    else:
        writer.add(f"{PREFIX}{mod}.lora_A.weight", a.to(dtype))
        writer.add(f"{PREFIX}{mod}.lora_B.weight", b.to(dtype))
    result.ranks[mod], result.kept[mod] = a.shape[0], kept
    if tied_head is not None:  # the tied head's linear LoRA of the same delta: B_h = A_e^T, A_h = B_e^T
        writer.add(f"{PREFIX}{tied_head}.lora_A.weight", b.T.contiguous().to(dtype))
        writer.add(f"{PREFIX}{tied_head}.lora_B.weight", a.T.contiguous().to(dtype))
        result.ranks[tied_head], result.kept[tied_head] = a.shape[0], kept
    if bias_changed:  # the fine-tuned bias replaces the base layer's (peft loads base_layer keys as they are)
        writer.add(f"{PREFIX}{mod}.base_layer.bias", pairs["bias"][1].to(out_dtype or pairs["bias"][1].dtype))
    return bias_changed


def _peft_config(result: ExtractResult, base, has_bias: bool) -> dict:
    """peft's LoraConfig fields (mergekit: ``extract_lora.py:196-216``): r = the largest rank,
    ``lora_alpha`` = r, and ``rank_pattern`` = ``alpha_pattern`` for the modules of another rank, so
    every module's scale alpha / r is 1."""
    r = max(result.ranks.values(), default=1)
    other = {m: k for m, k in result.ranks.items() if k != r}
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(Path(base).absolute()),
           "r": r, "lora_alpha": r, "rank_pattern": other, "alpha_pattern": dict(other), "use_rslora": False,
           "target_modules": sorted(result.ranks), "modules_to_save": sorted(result.whole) or None,
           "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "lora_only" if has_bias else "none",
           "inference_mode": True}
    return cfg
