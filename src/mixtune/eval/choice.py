"""Multiple choice by log-likelihood (MMLU/ARC/HellaSwag style), scored as lm-evaluation-harness does.

Every number here is the one lm-evaluation-harness 0.4.x (EleutherAI, MIT) reports with its
Hugging Face backend: the same tokenization of each (context, continuation) pair, the same left
truncation, the same ``acc``, ``acc_norm`` and standard errors. What differs is the cost: each
distinct context runs through the model once, and all its continuations are scored from that
context's KV cache, so a question with 4 choices encodes its (long) context once instead of 4 times.
Log-softmax is taken in float32 (lm-eval takes it in the model's dtype: the same for float32 models).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mixtune.core import DataError
from mixtune.models.prefix import cache_arg, cache_rows, last_logits_only, pad_after, prefix_cache, shared_prefix

_TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length


@dataclass(frozen=True)
class ChoiceItem:
    """One question: the context, its choices (text without the delimiter) and the gold index."""

    context: str
    choices: Sequence[str]
    gold: int


@dataclass(frozen=True)
class ChoiceResult:
    """Per-item scores and their means, named as lm-evaluation-harness names them."""

    loglikelihoods: list[list[float]]  # per item, per choice: log P(delimiter + choice | context)
    pred: list[int]  # argmax of the log-likelihoods (acc's prediction)
    pred_norm: list[int]  # argmax of log-likelihood / len(choice) in characters (acc_norm's)
    acc: list[float]
    acc_norm: list[float]
    acc_mean: float
    acc_norm_mean: float
    acc_stderr: float
    acc_norm_stderr: float


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], *,
                 add_bos_token: bool | None = None) -> list[tuple[list[int], list[int]]]:
    """Token ids of each ``(context, continuation)`` exactly as lm-evaluation-harness's HF backend makes them.

    lm-eval 0.4.x ``TemplateLM.loglikelihood`` / ``_encode_pair``: trailing whitespace of the
    context moves to the front of the continuation; then the *whole* string and the context are
    encoded separately and the continuation is ``whole[len(context_ids):]`` (so a merge across the
    boundary is scored as part of the continuation). An empty context becomes the prefix token
    (BOS, else EOS), or the continuation's first token when that already is the prefix token.
    ``tok_encode`` uses the tokenizer's default special tokens unless ``add_bos_token`` is given,
    and none when the string already starts with the prefix token's text. Each distinct string is
    encoded once, in batches (the same ids as one ``encode`` call each).
    """
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix_text = tokenizer.decode(prefix_id) if prefix_id is not None else None

    def key(text: str, special: bool | None = None) -> tuple[str, bool | None]:  # lm-eval's HFLM.tok_encode
        if special is None and prefix_text is not None and text.startswith(prefix_text):
            special = False  # the text already holds the BOS
        elif special is None:
            special = add_bos_token
        return text, special

    jobs = []  # per pair: ("empty", continuation key) or (context key, whole key)
    for context, continuation in pairs:
        if context == "":
            jobs.append((None, key(continuation, special=False)))
            continue
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        jobs.append((key(context), key(context + continuation)))
    ids: dict[tuple[str, bool | None], list[int]] = {}
    todo = sorted({k for job in jobs for k in job if k is not None}, key=lambda k: (str(k[1]), k[0]))
    for special in {k[1] for k in todo}:
        texts = [t for t, s in todo if s == special]
        kwargs = {} if special is None else {"add_special_tokens": special}
        ids.update(zip([(t, special) for t in texts], tokenizer(texts, **kwargs)["input_ids"], strict=True))
    out = []
    for ctx_key, other in jobs:
        if ctx_key is None:
            cont = ids[other]
            out.append(([prefix_id], cont) if prefix_id != cont[0] else (cont[:1], cont[1:]))
        else:
            ctx = ids[ctx_key]
            out.append((ctx, ids[other][len(ctx):]))
    return out


def encode_pair(tokenizer, context: str, continuation: str, *,
                add_bos_token: bool | None = None) -> tuple[list[int], list[int]]:
    """One pair's ``(context ids, continuation ids)``; see :func:`encode_pairs` (lm-eval's ``_encode_pair``)."""
    return encode_pairs(tokenizer, [(context, continuation)], add_bos_token=add_bos_token)[0]


def max_length_of(model, tokenizer) -> int:
    """lm-eval's ``resolve_max_length``: ``n_positions``, ``max_position_embeddings`` or ``n_ctx`` of
    the (text) config, else the tokenizer's ``model_max_length`` unless unset, else 2048."""
    cfg = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None) is not None:
            return int(getattr(cfg, attr))
    tok_max = getattr(tokenizer, "model_max_length", None)
    return int(tok_max) if tok_max is not None and tok_max != _TOKENIZER_INFINITY else 2048


def continuation_loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 16,
                                max_length: int | None = None,
                                add_bos_token: bool | None = None) -> list[tuple[float, bool]]:
    """Sum of log P(continuation token | everything before it) and lm-eval's ``is_greedy``, per request.

    Definition as in lm-evaluation-harness 0.4.x ``HFLM._loglikelihood_tokens``: with
    ``c, x = encode_pair(context, continuation)`` the model reads ``(c + x)[-(L+1):][:-1]``
    (left truncation to the model's length ``L``) and the result is ``sum_j log softmax(z_j)[x_j]``
    over the continuation positions; ``is_greedy`` is whether ``argmax z_j == x_j`` for every ``j``.

    Requests with the same (truncated) context tokens share one pass over the context; their
    continuations then run from its KV cache. When all contexts start with the same tokens (a
    few-shot prompt, a task description: at least 16 tokens), that prefix runs once and every
    context continues from its cache. Contexts are padded on the left of what follows the shared
    prefix, so only the last context position goes through the output head.

    Args:
        model: a Hugging Face causal LM (eval mode is set here).
        tokenizer: its tokenizer.
        requests: ``(context, continuation)`` strings; the continuation carries its leading space.
        batch_size: most rows in one forward pass (contexts, or continuations read from their cache).
        max_length: the model's window; by default as lm-eval resolves it (:func:`max_length_of`).
        add_bos_token: lm-eval's ``add_bos_token`` model argument (None: the tokenizer's default).

    Returns:
        ``(loglikelihood, is_greedy)`` per request, in order.

    Raises:
        DataError: a continuation encodes to no tokens or to more than ``max_length``, or a
            context to no tokens.
    """
    max_length = max_length or max_length_of(model, tokenizer)
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}  # context ids -> (request, continuation ids)
    encoded = encode_pairs(tokenizer, requests, add_bos_token=add_bos_token)
    for i, ((context, continuation), (ctx, cont)) in enumerate(zip(requests, encoded, strict=True)):
        if not 0 < len(cont) <= max_length:
            raise DataError(f"request {i}: continuation {continuation!r} encodes to {len(cont)} tokens; "
                            f"expected 1 to {max_length} (the model's length)")
        if not ctx:
            raise DataError(f"request {i}: context {context!r} encodes to no tokens; expected text")
        ctx = ctx[-(max_length + 1 - len(cont)):]  # lm-eval's left truncation of context + continuation
        groups.setdefault(tuple(ctx), []).append((i, cont))

    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keep = last_logits_only(model)
    cache_kw = cache_arg(model)
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    # longest contexts first: each batch pads little and memory peaks at once
    order = sorted(groups, key=lambda c: (-len(c), c))
    shared = shared_prefix(order)
    with torch.inference_mode():
        start_cache = prefix_cache(model, shared)
        for start in range(0, len(order), batch_size):
            _score_batch(model, order[start:start + batch_size], groups, out, pad_id, device, keep, cache_kw,
                         batch_size, shared, start_cache)
    return out


def _score_batch(model, ctxs, groups, out, pad_id, device, keep, cache_kw, batch_size, shared,
                 start_cache) -> None:
    """One context pass (from the shared prefix's cache, if any, then left-padded), then the continuations
    from its KV cache, ``batch_size`` rows at a time; fills ``out``."""
    ids, mask, pos = pad_after(shared, ctxs, pad_id, device)  # (B, Lc) after the shared prefix, if any
    past = {cache_kw: cache_rows(start_cache, torch.zeros(len(ctxs), dtype=torch.long, device=device))} \
        if shared else {}
    res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep, **past)
    first = torch.log_softmax(res.logits[:, -1].float(), dim=-1)  # (B, V): predicts continuation token 0
    cache = getattr(res, cache_kw)
    rows = [(b, i, cont) for b, c in enumerate(ctxs) for i, cont in groups[c]]
    one = [r for r in rows if len(r[2]) == 1]  # scored by the context pass alone
    tails = sorted((r for r in rows if len(r[2]) > 1), key=lambda r: len(r[2]))  # need the continuation read
    for b, i, cont in one:
        out[i] = (float(first[b, cont[0]]), bool(first[b].argmax() == cont[0]))
    for start in range(0, len(tails), batch_size):
        chunk = tails[start:start + batch_size]
        lk = max(len(cont) - 1 for _, _, cont in chunk)
        which = torch.tensor([b for b, _, _ in chunk], device=device)
        rows_cache = cache_rows(cache, which)  # one cache row per continuation, copied from its context's row
        x = torch.tensor([cont[:-1] + [pad_id] * (lk + 1 - len(cont)) for _, _, cont in chunk], device=device)
        xmask = torch.tensor([[1] * (len(cont) - 1) + [0] * (lk + 1 - len(cont)) for _, _, cont in chunk],
                             device=device)
        xpos = mask.sum(-1)[which, None] + torch.arange(lk, device=device)  # continue after each context
        later = model(input_ids=x, attention_mask=torch.cat([mask[which], xmask], dim=1), position_ids=xpos,
                      use_cache=True, **{cache_kw: rows_cache}).logits
        later = torch.log_softmax(later.float(), dim=-1)  # (R, Lk, V): predicts continuation tokens 1..
        for r, (b, i, cont) in enumerate(chunk):
            logp = torch.cat([first[b, None], later[r, :len(cont) - 1]])  # (len(cont), V)
            target = torch.tensor(cont, device=device)
            out[i] = (float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))


def _argmax(values: Sequence[float]) -> int:
    """Index of the first largest value (``numpy.argmax``'s rule for ties)."""
    return max(range(len(values)), key=values.__getitem__)


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's ``mean_stderr``: sample standard deviation (n - 1) over sqrt(n); NaN below 2 items."""
    n = len(values)
    if n < 2:
        return math.nan
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def choice_metrics(loglikelihoods: Sequence[Sequence[float]], choices: Sequence[Sequence[str]],
                   gold: Sequence[int]) -> ChoiceResult:
    """``acc`` and ``acc_norm`` from per-choice log-likelihoods, as lm-evaluation-harness 0.4.x defines them.

    lm-eval ``ConfigurableTask.process_results`` (multiple_choice): ``pred = argmax_i ll_i``,
    ``pred_norm = argmax_i ll_i / len(choice_i)`` where ``len`` counts the *characters* of the
    choice text without the target delimiter (not tokens, not bytes); ties go to the first index.
    ``acc = [pred == gold]``, ``acc_norm = [pred_norm == gold]``; each metric's mean over items and
    its standard error ``s / sqrt(n)`` with the sample standard deviation ``s`` (``mean_stderr``).

    Raises:
        DataError: an item's gold index is outside its choices, or a choice is empty.
    """
    pred, pred_norm, acc, acc_norm = [], [], [], []
    for k, (lls, texts, g) in enumerate(zip(loglikelihoods, choices, gold, strict=True)):
        if not (isinstance(g, int) and 0 <= g < len(texts)):
            raise DataError(f"item {k}: gold index {g!r}; expected an integer in 0..{len(texts) - 1}")
        if any(len(t) == 0 for t in texts):
            raise DataError(f"item {k}: choice {[len(t) for t in texts].index(0)} is empty; "
                            f"expected text (acc_norm divides by its length in characters)")
        pred.append(_argmax(lls))
        pred_norm.append(_argmax([ll / len(t) for ll, t in zip(lls, texts, strict=True)]))
        acc.append(float(pred[-1] == g))
        acc_norm.append(float(pred_norm[-1] == g))
    n = max(len(acc), 1)
    return ChoiceResult([list(x) for x in loglikelihoods], pred, pred_norm, acc, acc_norm,
                        sum(acc) / n, sum(acc_norm) / n, mean_stderr(acc), mean_stderr(acc_norm))


def score_multiple_choice(model, tokenizer, items: Sequence[ChoiceItem], *, target_delimiter: str = " ",
                          batch_size: int = 16, max_length: int | None = None,
                          add_bos_token: bool | None = None) -> ChoiceResult:
    """Score questions by the log-likelihood of each choice (lm-evaluation-harness ``multiple_choice``).

    Each choice ``i`` becomes the request ``(context, target_delimiter + choice_i)`` (lm-eval's
    ``construct_requests``, default delimiter ``" "``); :func:`continuation_loglikelihoods` scores
    them, each context encoded once; :func:`choice_metrics` turns them into ``acc``/``acc_norm``.

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer.
        items: the questions (the context already holds any few-shot examples and the prompt).
        target_delimiter: put between context and choice, as lm-eval's task option of that name.
        batch_size, max_length, add_bos_token: as in :func:`continuation_loglikelihoods`.

    Raises:
        DataError: an item has no choices, an empty choice or a gold index outside its choices.
    """
    for k, item in enumerate(items):
        if not item.choices:
            raise DataError(f"item {k}: no choices; expected at least one choice text")
    requests = [(item.context, target_delimiter + c) for item in items for c in item.choices]
    scored = continuation_loglikelihoods(model, tokenizer, requests, batch_size=batch_size,
                                         max_length=max_length, add_bos_token=add_bos_token)
    lls, start = [], 0
    for item in items:
        lls.append([ll for ll, _ in scored[start:start + len(item.choices)]])
        start += len(item.choices)
    return choice_metrics(lls, [item.choices for item in items], [item.gold for item in items])
