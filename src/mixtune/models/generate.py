"""Batched generation: left padding, KV cache, per-example stop at EOS or a stop string.

Prompts sorted by length share batches; a prefix every prompt starts with (a few-shot prompt) runs
once and each batch continues from its cache (:mod:`mixtune.models.prefix`).

Greedy by default. Sampling (temperature, top-k, top-p, several samples per prompt) runs on the
same batched ``model.generate`` path: a logits processor draws each row's next token from that
row's own seeded stream and hands ``generate`` a one-hot score, so its greedy argmax takes the
drawn token. Cache, padding, EOS and stop strings are therefore handled exactly as for greedy.

Seeding. The stream of the completion (prompt, j) is ``max_new_tokens`` uniforms from a
``torch.Generator`` seeded with a hash of (seed, j, prompt text). Step t turns uniform t into a
token by inverse CDF. A completion therefore depends only on its prompt, j, the seed and the
decoding parameters, never on batch size, batch composition or prompt order. (HF's
``do_sample=True`` draws the whole batch from the global RNG, so a prompt's samples change with its
batch.) The one limit is floating point: when a batch's padding changes, the logits can change in
the last bits, and that can move a token only if its uniform lies that close to a CDF boundary.
Identical prompts get identical samples.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from mixtune.core import ConfigError
from mixtune.models.load import pad_id_of
from mixtune.models.prefix import cache_arg, cache_rows, last_logits_only, pad_after, prefix_cache, shared_prefix


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128, batch_size: int = 64,
             stop: Sequence[str] = (), progress=None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0) -> list[str]:
    """One completion per prompt of ``prompts`` (already rendered with the chat template); greedy by default.

    Prompts are sorted by length and cut into batches, so each batch pads little; results come
    back in the input order. Generation uses the model's KV cache and stops, per example, at the
    tokenizer's EOS or once any of ``stop`` appears; the completion is cut before the stop string.
    With ``temperature > 0`` each prompt gets one sample, the same as sample 0 of :func:`sample`
    with the same arguments.

    Args:
        model: a causal LM (eval mode is set here).
        tokenizer: its tokenizer.
        prompts: rendered prompts (special tokens included, e.g. by :func:`mixtune.data.format.prompt_text`).
        max_new_tokens: generation budget per example.
        batch_size: prompts per forward pass.
        stop: extra stop strings.
        progress: optional callable given the number of prompts finished after each batch.
        temperature: 0 for greedy decoding; > 0 to sample (see :func:`sampling_probs`).
        top_k: when sampling, keep the k most likely tokens (0 keeps all).
        top_p: when sampling, keep the smallest set of most likely tokens with mass >= top_p (1 keeps all).
        seed: seed of the per-prompt sampling streams (unused for greedy).

    Returns:
        One completion per prompt, special tokens removed.

    Raises:
        ConfigError: a decoding parameter is out of range, or top_k/top_p is set for greedy decoding.
    """
    check_decoding(temperature=temperature, top_k=top_k, top_p=top_p, num_samples=1)
    texts = _decode(model, tokenizer, prompts, num_samples=1, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, stop=stop, progress=progress,
                    temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return [t[0] for t in texts]


def sample(model, tokenizer, prompts: Sequence[str], *, num_samples: int = 1, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0, max_new_tokens: int = 128,
           batch_size: int = 64, stop: Sequence[str] = (), progress=None,
           return_ids: bool = False) -> list[list[str]] | list[list[tuple[str, list[int]]]]:
    """``num_samples`` sampled completions per prompt, each from its own seeded stream (see the module doc).

    Completions are batched as in :func:`generate`; ``batch_size`` counts completions (a prompt
    with 10 samples fills 10 rows). Completion j of a prompt is the same whatever the batch size,
    the other prompts or their order, and sample 0 equals ``generate(..., temperature=...)``.
    ``temperature=0`` is allowed only with ``num_samples=1`` (it is greedy, so every sample would be
    the same).

    Args:
        model, tokenizer, prompts, max_new_tokens, stop: as for :func:`generate`.
        num_samples: completions per prompt (n of pass@k).
        temperature: softmax temperature, > 0 (0 means greedy, only with one sample).
        top_k: keep the k most likely tokens (0 keeps all).
        top_p: keep the smallest set of most likely tokens with mass >= top_p (1 keeps all).
        seed: seed of the streams; a different seed gives different samples.
        batch_size: completions per forward pass.
        progress: optional callable given the number of prompts whose samples all finished, after each batch.
        return_ids: give each completion with the token ids the model generated (through its first
            EOS, included; all ``max_new_tokens`` when it never stopped), for training on them. Without
            ``stop`` strings, these samples come from a decoding loop whose finished rows leave the
            batch (:func:`_sample_shrinking`): the same tokens, in less time when lengths vary.

    Returns:
        For each prompt, in input order, a list of ``num_samples`` completions (sample index order);
        with ``return_ids``, ``(text, ids)`` pairs.

    Raises:
        ConfigError: a decoding parameter is out of range.
    """
    check_decoding(temperature=temperature, top_k=top_k, top_p=top_p, num_samples=num_samples)
    if return_ids and not stop and temperature > 0:
        return _sample_shrinking(model, tokenizer, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return _decode(model, tokenizer, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                   batch_size=batch_size, stop=stop, progress=progress,
                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, return_ids=return_ids)


def max_tokens_for(records: list[dict], tokenizer, slack: float = 4.0, floor: int = 128) -> int:
    """A generation budget with room for a verbose model: ``max(floor, ceil(slack * longest))``, where
    ``longest`` is the longest gold reply of ``records`` in ``tokenizer``'s tokens.

    The gold replies are terse (``2+8=10. 10-4=6. Answer: 6``). An instruct model writes each
    step as a sentence, often restating the question first: some 3-4 times the tokens, hence
    ``slack = 4``. Even before a one-word answer it writes a sentence or two, and a 3-step word
    problem worked in prose runs to some 50-100 tokens of a 50k-token vocabulary (a rough count
    of typical replies), hence the floor of 128. Generation stops once every sequence of a batch
    has emitted EOS (:func:`mixtune.models.generate.generate`), so a model that stops pays nothing
    for the room; one that never stops (an untrained model) runs the whole budget, about 3x the
    time of the old one. (The budget was once 1.5x the gold, at least 16: a real 135M instruct
    model was cut off before its ``Answer:`` line on 19 of 20 maths problems.)
    """
    longest = max(len(tokenizer(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"])
                  for r in records)
    return max(floor, math.ceil(slack * longest))


def check_decoding(*, temperature: float, top_k: int, top_p: float, num_samples: int) -> None:
    """Raise :class:`ConfigError` for decoding parameters that are out of range or would have no effect."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature = {temperature!r}: expected a number >= 0 (0 is greedy decoding)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"top_k = {top_k!r}: expected an integer >= 0 (0 keeps every token)")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ConfigError(f"top_p = {top_p!r}: expected a number in (0, 1] (1 keeps every token)")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples = {num_samples!r}: expected an integer >= 1")
    if temperature == 0:
        if top_k or top_p != 1:
            raise ConfigError(f"top_k = {top_k}, top_p = {top_p} have no effect with temperature = 0 (greedy "
                              "decoding); set temperature > 0 to sample, or drop top_k/top_p")
        if num_samples > 1:
            raise ConfigError(f"num_samples = {num_samples} with temperature = 0: greedy decoding gives the same "
                              "completion every time; set temperature > 0 to sample, or num_samples = 1")


def sampling_probs(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """Next-token distribution for temperature, top-k and nucleus (top-p) sampling, in that order (as HF's warpers).

    Temperature (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration",
    arXiv:1904.09751, §3.3): ``P(x) = exp(u_x / T) / sum_y exp(u_y / T)``.
    Top-k (Fan et al. 2018, "Hierarchical Neural Story Generation", arXiv:1805.04833, §5; Holtzman
    et al. §3.2): tokens whose logit is below the k-th largest are dropped (ties with it are kept,
    as in HF's ``TopKLogitsWarper``).
    Top-p (Holtzman et al. 2020, §3.1, Eq. 2-3): the nucleus ``V(p)`` is the smallest set of most
    likely tokens with ``sum_{x in V(p)} P(x) >= p``, i.e. token x (in descending order, ties by
    index) is kept iff the mass strictly before it is < p; then ``P'(x) = P(x) / sum_{V(p)} P``.

    Args:
        logits: (..., V) scores.
        temperature: > 0.
        top_k: 0 or >= V keeps every token.
        top_p: in (0, 1]; 1 keeps every token.

    Returns:
        (..., V) probabilities summing to 1 over the last dimension, 0 on dropped tokens.
    """
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
        drop = before >= top_p
        drop[..., 0] = False  # the most likely token always stays
        probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the first index i with ``cumsum(probs)[i] > u * sum(probs)``, per row.

    Args:
        probs: (B, V) non-negative weights.
        u: (B,) uniforms in [0, 1).

    Returns:
        (B,) token ids; a token of probability 0 is never drawn (float64 keeps u * total < total).
    """
    cdf = probs.double().cumsum(-1)  # (B, V)
    v = u.double() * cdf[:, -1]
    return torch.searchsorted(cdf, v[:, None], right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def stream_seed(seed: int, index: int, prompt: str) -> int:
    """Seed of the stream of completion ``index`` of ``prompt``: 63 bits of BLAKE2b over (seed, index, prompt)."""
    digest = hashlib.blake2b(f"{seed}\x00{index}\x00{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _uniforms(seed: int, rows: Sequence[tuple[int, int]], prompts: Sequence[str], n: int) -> torch.Tensor:
    """``(B, n)`` float64 uniforms: row (i, j)'s stream, sample j of prompt i (see the module doc)."""
    return torch.stack([torch.rand(n, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(stream_seed(seed, j, prompts[i])))
                        for i, j in rows])


@torch.inference_mode()
def _sample_shrinking(model, tokenizer, prompts: Sequence[str], *, num_samples: int, max_new_tokens: int,
                      batch_size: int, temperature: float, top_k: int, top_p: float, seed: int) -> list[list]:
    """Sampled completions and their ids, as :func:`_decode` draws them (each row's own stream, the
    same inverse-CDF draw), from a loop of its own: a prompt's samples share one reading of the
    prompt (its KV cache copied to each), and a row that emits EOS leaves the batch and its KV
    cache, so a step costs the rows still running rather than the whole batch until its longest
    sample ends (in RL, a few long samples would otherwise set the pace of all)."""
    model.eval()
    pad_id = pad_id_of(tokenizer)
    eos = tokenizer.eos_token_id
    rows = sorted(((i, j) for i in range(len(prompts)) for j in range(num_samples)), key=lambda r: len(prompts[r[0]]))
    out: list[list] = [[None] * num_samples for _ in prompts]
    device = next(model.parameters()).device
    tokens = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    kw = cache_arg(model)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        # each distinct prompt is read once; its samples' rows start from copies of its cache
        distinct = list(dict.fromkeys(i for i, _ in batch))
        ids, mask, _ = pad_after((), [tokens[i] for i in distinct], pad_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        uniforms = _uniforms(seed, batch, prompts, max_new_tokens)
        res = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **last_logits_only(model))
        which = torch.tensor([distinct.index(i) for i, _ in batch], device=device)
        cache, logits = getattr(res, kw), res.logits[:, -1][which]
        cache.reorder_cache(which)
        mask, positions = mask[which], positions[which]
        live = torch.arange(len(batch))  # the batch rows still generating, in cache order
        made: list[list[int]] = [[] for _ in batch]
        last = positions[:, -1]
        for t in range(max_new_tokens):
            probs = sampling_probs(logits.float(), temperature=temperature, top_k=top_k, top_p=top_p)
            drawn = draw(probs, uniforms[live, t].to(probs.device))
            for r, tok in zip(live.tolist(), drawn.tolist()):
                made[r].append(tok)
            going = drawn != eos if eos is not None else torch.ones_like(drawn, dtype=torch.bool)
            if t == max_new_tokens - 1 or not going.any():
                break
            if not going.all():  # finished rows leave the batch and the cache
                keep = going.nonzero().squeeze(-1)
                cache.reorder_cache(keep)
                live, drawn, mask, last = live[keep.cpu()], drawn[keep], mask[keep], last[keep]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            last = last + 1
            res = model(input_ids=drawn[:, None], attention_mask=mask, position_ids=last[:, None], use_cache=True,
                        **{kw: cache})
            cache, logits = getattr(res, kw), res.logits[:, -1]
        for (i, j), ids_made in zip(batch, made):
            out[i][j] = (tokenizer.decode(ids_made, skip_special_tokens=True), ids_made)
    return out


def _through_eos(ids: list[int], eos: int | None) -> list[int]:
    """Generated ids up to and including the first EOS (what follows it is padding)."""
    return ids[:ids.index(eos) + 1] if eos is not None and eos in ids else ids


class _SeededDraw(LogitsProcessor):
    """Replace each row's scores by a one-hot of the token drawn from that row's stream, so greedy picks it."""

    def __init__(self, uniforms: torch.Tensor, prompt_len: int, temperature: float, top_k: int, top_p: float):
        self.uniforms, self.prompt_len = uniforms, prompt_len  # (B, max_new_tokens)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_len
        probs = sampling_probs(scores, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        token = draw(probs, self.uniforms[:, step].to(scores.device))
        return torch.full_like(scores, float("-inf")).scatter_(-1, token[:, None], 0.0)


def _decode(model, tokenizer, prompts: Sequence[str], *, num_samples: int, max_new_tokens: int, batch_size: int,
            stop: Sequence[str], progress: Callable[[int], object] | None, temperature: float, top_k: int,
            top_p: float, seed: int, return_ids: bool = False) -> list[list]:
    """Completions (prompt i, sample j) in batches of ``batch_size`` rows; greedy when temperature is 0;
    with ``return_ids`` each with its generated token ids (through the first EOS)."""
    model.eval()
    pad_id = pad_id_of(tokenizer)
    # rows sorted by prompt length (a prompt's samples stay together); stable, so ties keep input order
    rows = sorted(((i, j) for i in range(len(prompts)) for j in range(num_samples)),
                  key=lambda r: len(prompts[r[0]]))
    out: list[list] = [[""] * num_samples for _ in prompts]
    left = [num_samples] * len(prompts)
    device = next(model.parameters()).device
    tokens = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    shared = shared_prefix(tokens)
    with torch.inference_mode():
        start_cache = prefix_cache(model, shared)
    cache_kw = cache_arg(model)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        ids, mask, _ = pad_after(shared, [tokens[i] for i, _ in batch], pad_id, device)
        past = {}
        if shared:  # the batch continues from the shared prefix's cache: [shared][pad...][own tokens]
            ids = torch.cat([torch.tensor([shared], device=device).expand(len(batch), -1), ids], dim=1)
            past = {cache_kw: cache_rows(start_cache, torch.zeros(len(batch), dtype=torch.long, device=device))}
        processors = None
        if temperature > 0:
            uniforms = _uniforms(seed, batch, prompts, max_new_tokens)  # (B, max_new_tokens)
            processors = LogitsProcessorList([_SeededDraw(uniforms, ids.shape[1], temperature, top_k, top_p)])
        with torch.inference_mode():
            generated = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                use_cache=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
                stop_strings=list(stop) or None, tokenizer=tokenizer if stop else None,
                temperature=None, top_p=None, top_k=None, logits_processor=processors, **past,
            )
        new = generated[:, ids.shape[1]:]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        done = 0
        for r, ((i, j), text) in enumerate(zip(batch, texts)):
            for s in stop:
                text = text.split(s, 1)[0]
            out[i][j] = (text, _through_eos(new[r].tolist(), tokenizer.eos_token_id)) if return_ids else text
            left[i] -= 1
            done += left[i] == 0
        if progress is not None:
            progress(done)
    return out
