"""Batched greedy generation: left padding, KV cache, per-example stop at EOS or a stop string."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128, batch_size: int = 64,
             stop: Sequence[str] = (), progress=None) -> list[str]:
    """Greedy completions of ``prompts`` (already rendered with the chat template).

    Prompts are sorted by length and cut into batches, so each batch pads little; results come
    back in the input order. Generation uses the model's KV cache and stops, per example, at the
    tokenizer's EOS or once any of ``stop`` appears; the completion is cut before the stop string.

    Args:
        model: a causal LM (eval mode is set here).
        tokenizer: its tokenizer; padding is put on the left for generation.
        prompts: rendered prompts (special tokens included, e.g. by :func:`mixtune.data.format.prompt_text`).
        max_new_tokens: generation budget per example.
        batch_size: prompts per forward pass.
        stop: extra stop strings.
        progress: optional callable given the number of prompts finished after each batch.

    Returns:
        One completion per prompt, special tokens removed.
    """
    model.eval()
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            ids = model.generate(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
                stop_strings=list(stop) or None, tokenizer=tokenizer if stop else None,
                temperature=None, top_p=None, top_k=None,
            )
        texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, text in zip(idx, texts):
            for s in stop:
                text = text.split(s, 1)[0]
            out[i] = text
        if progress is not None:
            progress(len(idx))
    return out
