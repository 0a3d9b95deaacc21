"""A prefix shared by every prompt of a task (a few-shot prompt, a task description) runs once.

Both scoring paths use it: :mod:`mixtune.eval.choice` (log-likelihoods) and
:mod:`mixtune.models.generate` (completions). The shared tokens go through the model once, as a
batch of one; each batch then starts from copies of that KV cache and pads *after* the shared
part (``[shared][pad...][own tokens]``, the padding masked out), so every row's last column is its
last prompt token and positions follow from the attention mask. The numbers are those of running
each prompt whole, up to float rounding (the same matrix products, cut differently).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch

MIN_SHARED_PREFIX = 16  # tokens; below this a separate prefix pass costs more than it saves


def shared_prefix(prompts: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The tokens every prompt starts with, leaving each at least one token of its own; empty when there
    are fewer than two prompts or the common start is shorter than :data:`MIN_SHARED_PREFIX`."""
    if len(prompts) < 2:
        return ()
    first, n = prompts[0], min(len(c) for c in prompts) - 1
    for c in prompts[1:]:
        n = next((j for j in range(n) if c[j] != first[j]), n)
    return tuple(first[:n]) if n >= MIN_SHARED_PREFIX else ()


def cache_arg(model) -> str:
    """The keyword under which the model's forward takes a KV cache (transformers 5.x renamed it)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def last_logits_only(model) -> dict:
    """The forward keyword that computes the output head at the last position only, where the model has it."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def prefix_cache(model, shared: Sequence[int]):
    """The KV cache after the model reads ``shared`` (a batch of one), or None when ``shared`` is empty."""
    if not shared:
        return None
    device = next(model.parameters()).device
    res = model(input_ids=torch.tensor([list(shared)], device=device), use_cache=True, **last_logits_only(model))
    return getattr(res, cache_arg(model))


def cache_rows(cache, which: torch.Tensor):
    """A new cache whose row r is row ``which[r]`` of ``cache``; ``cache`` itself is left as it was
    (``reorder_cache`` replaces each layer's tensors, it does not edit them)."""
    rows = copy.copy(cache)
    rows.layers = [copy.copy(layer) for layer in cache.layers]
    rows.reorder_cache(which)
    return rows


def pad_after(shared: Sequence[int], prompts: Sequence[Sequence[int]], pad_id: int, device):
    """Input ids and attention mask of a batch that continues from ``shared``'s cache.

    Returns ``(ids, mask, positions)``: ``ids`` (B, L) holds each prompt's tokens after the shared
    prefix, left-padded to the longest; ``mask`` (B, len(shared) + L) covers the cached prefix too;
    ``positions`` (B, L) are the real positions of ``ids`` (counting the prefix).
    """
    g = len(shared)
    own = [list(p[g:]) for p in prompts]
    width = max(len(o) for o in own)
    ids = torch.tensor([[pad_id] * (width - len(o)) + o for o in own], device=device)
    mask = torch.tensor([[1] * g + [0] * (width - len(o)) + [1] * len(o) for o in own], device=device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)[:, g:]
