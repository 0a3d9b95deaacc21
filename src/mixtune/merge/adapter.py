"""A peft LoRA adapter read as the full model it makes with its base, tensor by tensor.

Wherever a merge takes a model it takes an adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``): each base tensor a LoRA module targets is returned as
W + s * B A (Hu et al., 2021, arXiv:2106.09685, Eq. 3), with s = lora_alpha / r, or
lora_alpha / sqrt(r) for rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732), per-module ``r`` and
``alpha_pattern`` honoured; embedding LoRA adds (B A)^T, ``fan_in_fan_out`` transposes. Tensors the
adapter saves whole (``modules_to_save``, embeddings saved with the adapter) replace the base's.
Every other tensor is the base's, read as stored. DoRA, LoRA biases and other peft types are
refused with the reason, since their merged weights are not W + s B A.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

from mixtune.core import CheckpointError
from mixtune.merge.io import CheckpointReader

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / CONFIG).exists()


def _pattern_value(patterns: dict, module: str, default):
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return default


class AdapterReader:
    """The tensors of ``base`` with a LoRA adapter applied; the reader interface of
    :class:`~mixtune.merge.io.CheckpointReader` (``folder`` is the adapter's).

    Raises:
        CheckpointError: not a LoRA adapter, an unsupported variant, weights missing or naming a
            module the base lacks (each message names the adapter folder).
    """

    def __init__(self, folder: str | Path, base: CheckpointReader, label: str | None = None) -> None:
        self.folder, self.base = Path(folder), base
        self.label = label or str(folder)
        try:
            cfg = json.loads((self.folder / CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.label}: {CONFIG} is not readable JSON ({e})") from None
        kind = cfg.get("peft_type")
        if kind != "LORA":
            raise CheckpointError(f"{self.label}: peft type {kind!r}; merging takes LoRA adapters only")
        for flag, why in [("use_dora", "DoRA rescales each column by a learned magnitude"),
                          ("lora_bias", "LoRA biases add to the base bias")]:
            if cfg.get(flag):
                raise CheckpointError(f"{self.label}: {flag} adapters are not supported ({why}); merge it with "
                                      "peft's merge_and_unload and pass the merged folder")
        if not (self.folder / WEIGHTS).exists():
            raise CheckpointError(f"{self.label}: no {WEIGHTS}")
        try:
            self._file = safe_open(str(self.folder / WEIGHTS), framework="pt")
        except Exception as e:
            raise CheckpointError(f"{self.label}: {WEIGHTS} is not a valid safetensors file ({e})") from None
        self.cfg = cfg
        self.lora: dict[str, tuple[str, str, bool]] = {}  # base key -> (A key, B key, embedding)
        self.whole: dict[str, str] = {}  # base key -> adapter key of a tensor saved whole
        names = list(self._file.keys())
        for name in names:
            short = name.removeprefix(PREFIX)
            for a_suffix, b_suffix, emb in [(".lora_A.weight", ".lora_B.weight", False),
                                            (".lora_embedding_A", ".lora_embedding_B", True)]:
                if short.endswith(a_suffix):
                    module = short[: -len(a_suffix)]
                    b_name = name[: -len(a_suffix)] + b_suffix
                    if b_name not in names:
                        raise CheckpointError(f"{self.label}: {name} has no matching {b_name}")
                    self.lora[module + ".weight"] = (name, b_name, emb)
                    break
            else:
                if short.endswith((".lora_B.weight", ".lora_embedding_B")):
                    continue
                if ".lora_" in short:
                    raise CheckpointError(f"{self.label}: adapter tensor {name} is not a LoRA A/B pair this reader "
                                          "understands")
                self.whole[short.replace(".base_layer.", ".")] = name
        for key in [*self.lora, *self.whole]:
            if key not in base:
                raise CheckpointError(f"{self.label}: adapter changes {key}, which {base.label} lacks (tied "
                                      "embeddings?); merge it with peft's merge_and_unload and pass the merged folder")

    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.base

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    def dtype(self, key: str) -> str:
        return self.base.dtype(key)

    def scaling(self, module: str, r: int) -> float:
        alpha = _pattern_value(self.cfg.get("alpha_pattern"), module, self.cfg.get("lora_alpha", 8))
        return alpha / math.sqrt(r) if self.cfg.get("use_rslora") else alpha / r

    def get(self, key: str) -> torch.Tensor:
        """The tensor with the adapter applied: as stored where the adapter leaves it, else in float32."""
        w = self._file.get_tensor(self.whole[key]) if key in self.whole else self.base.get(key)
        if key not in self.lora:
            return w
        a_name, b_name, emb = self.lora[key]
        a, b = self._file.get_tensor(a_name).float(), self._file.get_tensor(b_name).float()
        delta = self.scaling(key[: -len(".weight")], a.shape[0]) * (b @ a)
        if emb or self.cfg.get("fan_in_fan_out"):
            delta = delta.T
        if tuple(delta.shape) != tuple(w.shape):
            raise CheckpointError(f"{self.label}: LoRA update of {key} has shape {list(delta.shape)}, the base tensor "
                                  f"{list(w.shape)}")
        return w.float() + delta

    def close(self) -> None:
        self._file = None
