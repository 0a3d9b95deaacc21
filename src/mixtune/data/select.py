"""Data selection by the model being tuned: GRAPE and perplexity filtering.

Both score each record's **last assistant turn** under a causal LM: the sum of its tokens' log
probabilities given everything before them, and how many tokens that is. Scores are computed in
batches and cached by content hash (model identity + rendered record), so a second run with the
same model and data computes nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from mixtune.core import DataError, Strict, atomic_write_text
from mixtune.data.format import IGNORE, render_with_spans


class SelectConfig(Strict):
    """Keep part of a source, chosen by the starting model's likelihood of each response."""

    method: Literal["grape", "perplexity"]
    """``grape``: per prompt, the candidate response with the highest length-normalised
    log-probability; ``perplexity``: the ``keep`` fraction of records with the lowest perplexity."""
    keep: float = Field(default=0.5, gt=0, le=1)
    """``perplexity`` only: share of records kept (at least one)."""
    batch_size: int = Field(default=16, ge=1)
    """Examples per scoring forward pass."""


def model_fingerprint(folder: Path) -> str:
    """Identity of a model folder for the cache: its path, config and weight files' sizes and times."""
    parts = [str(Path(folder).resolve())]
    for f in sorted(Path(folder).glob("*")):
        if f.suffix in (".json", ".safetensors"):
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def response_logprobs(records: list[dict], model, tokenizer, *, batch_size: int = 16, cache: Path | None = None,
                      fingerprint: str = "", progress: Callable[[int], None] | None = None) -> list[tuple[float, int]]:
    """``(sum of log p, token count)`` of each record's last assistant turn under ``model``.

    Records are rendered with the tokenizer's chat template; the scored tokens are those of the
    final assistant message. ``cache`` (a JSON file) maps a hash of (``fingerprint``, rendered
    text) to its score; only records missing from it are computed, and it is rewritten atomically.
    """
    keys, rendered = [], []
    for r in records:
        if "messages" not in r:
            raise DataError("selection scores a conversation's last assistant turn; a raw-text record "
                            "(continued pretraining) has none, so leave `select` off its source")
        if not r["messages"] or r["messages"][-1]["role"] != "assistant":
            raise DataError("selection scores the last assistant turn; a record does not end with one")
        text, spans = render_with_spans(r["messages"], tokenizer)
        rendered.append((text, spans[-1]))
        keys.append(hashlib.sha256(f"{fingerprint}|{text}".encode()).hexdigest())
    known = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    todo = [i for i, k in enumerate(keys) if k not in known]
    model.eval()
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        encodings = tokenizer.backend_tokenizer.encode_batch([rendered[i][0] for i in batch], add_special_tokens=False)
        width = max(len(e.ids) for e in encodings)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (i, enc) in enumerate(zip(batch, encodings)):
            a, b = rendered[i][1]
            ids[row, :len(enc.ids)] = torch.tensor(enc.ids)
            attention[row, :len(enc.ids)] = 1
            labels[row, :len(enc.ids)] = torch.tensor([t if a <= s < b else IGNORE for t, (s, _) in
                                                        zip(enc.ids, enc.offsets)])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE,
                              reduction="none").view_as(target)
        counted = target != IGNORE
        for row, i in enumerate(batch):
            known[keys[i]] = [-float(nll[row][counted[row]].sum()), int(counted[row].sum())]
        if progress is not None:
            progress(len(batch))
    if cache is not None and todo:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps(known))
    return [tuple(known[k]) for k in keys]  # type: ignore[misc]


def grape(records: list[dict], scores: list[tuple[float, int]]) -> list[int]:
    """GRAPE (Zhang et al., 2025, arXiv:2502.04194, Sec. 3): among records sharing a prompt (every
    message before the last), keep the one whose response has the highest length-normalised
    log-probability, (1/|y|) sum_t log p(y_t | x, y_<t), under the model to be tuned. Ties keep
    the first; returns the kept indices in their original order."""
    best: dict[str, tuple[float, int]] = {}
    for i, (r, (logp, n)) in enumerate(zip(records, scores)):
        prompt = json.dumps(r["messages"][:-1], sort_keys=True)
        value = logp / max(n, 1)
        if prompt not in best or value > best[prompt][0]:
            best[prompt] = (value, i)
    return sorted(i for _, i in best.values())


def perplexity_filter(scores: list[tuple[float, int]], keep: float) -> list[int]:
    """The floor(keep * n) records (at least one) whose responses have the lowest perplexity,
    exp(-(1/|y|) sum_t log p(y_t | x, y_<t)); ties keep the earlier record. Returns indices in order."""
    ppl = [math.exp(-logp / max(n, 1)) for logp, n in scores]
    k = max(1, math.floor(keep * len(scores)))
    return sorted(sorted(range(len(scores)), key=lambda i: (ppl[i], i))[:k])


def select(records: list[dict], cfg: SelectConfig, model, tokenizer, *, cache: Path | None = None,
           fingerprint: str = "") -> list[int]:
    """Indices of ``records`` that ``cfg`` keeps."""
    scores = response_logprobs(records, model, tokenizer, batch_size=cfg.batch_size, cache=cache,
                               fingerprint=fingerprint)
    return grape(records, scores) if cfg.method == "grape" else perplexity_filter(scores, cfg.keep)
