"""Render chat records to tokens, mask labels to assistant turns, and pack examples into rows.

**Rendering.** A record is rendered with the tokenizer's own chat template when
it has one (the text is exactly ``tokenizer.apply_chat_template``'s), else with
mixtune's default (the built-in model's format, :data:`mixtune.models.CHAT_TEMPLATE`),
with a warning, since another tokenizer splits its markers into several tokens::

    <bos><|user|>\\n{question}<eos>\\n<|assistant|>\\n{answer}<eos>\\n

**Label masking.** Only assistant turns are trained. The span of assistant turn
*i* is what rendering ``messages[:i+1]`` adds to rendering ``messages[:i]`` with
the generation prompt: the reply text plus the template's end-of-turn marker
(so the model learns to stop). The whole conversation is tokenized once; a
token is trained when its first character lies inside an assistant span, every
other label is -100. A template that rewrites earlier turns when later ones are
added (so the prefix property fails) is reported as an error, not guessed at.

**Packing.** Examples are placed into rows of exactly ``seq_len`` tokens by best
fit decreasing (longest first, each into the fullest row it still fits), so the
only padding is the unfilled tail of rows. Inside a row each example's
``position_ids`` restart at 0. Given ``position_ids`` and no attention mask
(and ``use_cache=False``), transformers builds a block-diagonal causal mask, so
**attention never crosses example boundaries**: each example's logits equal those
of the example run alone (tests/data/test_format.py checks it). The first label
of every example is -100, so no token is trained to predict across a boundary.
The placement works on lengths alone (:mod:`mixtune.data.packing`), so streamed
sources pack the same rows without holding their tokens (:mod:`mixtune.data.packed_files`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from mixtune.core import DataError, Strict
from mixtune.data.packing import IGNORE, fill_rows, plan_rows, ranges
from mixtune.models import CHAT_TEMPLATE

log = logging.getLogger(__name__)


class FormatConfig(Strict):
    """How records become training rows."""

    seq_len: int = Field(default=512, ge=8)
    """Length of every packed row, in tokens."""
    long_examples: Literal["error", "drop", "truncate"] = "error"
    """What to do with an example longer than ``seq_len``: stop with an error naming it, drop it
    (the count is reported), or keep its first ``seq_len`` tokens."""


@dataclass(frozen=True)
class Example:
    """One tokenized record."""

    input_ids: list[int]
    labels: list[int]
    """Same length as ``input_ids``; -100 where no loss is taken."""
    divisible: bool = False
    """Raw text (continued pretraining): when longer than a row, cut into row-long pieces instead of
    being an error, dropped or truncated."""


_WARNED: set[int] = set()  # tokenizers already warned about having no chat template


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        template = CHAT_TEMPLATE
        if id(tokenizer) not in _WARNED:
            _WARNED.add(id(tokenizer))
            pieces = len(tokenizer.tokenize("<|user|>"))
            log.warning(f"the tokenizer ({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) has "
                        f"no chat template: conversations are rendered in mixtune's default format (<|user|> ... "
                        f"<|assistant|> ...), whose marker <|user|> it splits into {pieces} token(s). For an instruct model, use its own tokenizer (with "
                        f"chat_template in tokenizer_config.json); for a base model this default is fine")
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def conditioned(messages: list[dict], condition: str | None) -> list[dict]:
    """The messages with a C-RLFT class tag before every turn's content (Wang et al., 2024,
    arXiv:2309.11235, Sec. 3.2: the condition is prefixed to each role marker; here it opens each
    turn, which works with any chat template). No tag: the messages unchanged."""
    if not condition:
        return messages
    return [m | {"content": f"{condition} {m['content']}"} for m in messages]


def render_with_spans(messages: list[dict], tokenizer, condition: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character spans of its assistant turns
    (after the class tag when there is a ``condition``: the tag is context, never trained)."""
    skip = len(condition) + 1 if condition else 0
    messages = conditioned(messages, condition)
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        last = i == len(messages) - 1  # then "through" is the full text, already rendered
        through = text if last else _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not text.startswith(through) or not through.startswith(before):
            raise DataError(
                "the chat template is not prefix-stable: rendering the first turns alone differs from the "
                "start of the full conversation, so assistant turns cannot be located for label masking "
                f"(turn {i}). Use a template without history rewriting, or set tokenizer.chat_template."
            )
        spans.append((len(before) + skip, len(through)))
    return text, spans


def prompt_text(messages: list[dict], tokenizer, condition: str | None = None) -> str:
    """What a model is given to generate the final assistant turn: every earlier turn plus the
    generation prompt, rendered exactly as in training; with a ``condition`` (C-RLFT's inference
    condition) every turn carries the tag and the reply starts with it."""
    end = len(messages) - 1 if messages and messages[-1]["role"] == "assistant" else len(messages)
    text = _render(tokenizer, conditioned(messages[:end], condition), generation_prompt=True)
    return text + f"{condition} " if condition else text


def tokenize_records(records: Sequence[dict], tokenizer) -> list[Example]:
    """Token ids of each rendered record and labels that keep only assistant tokens.

    The conversations are encoded in one batch by the Rust tokenizer (about 2x faster than
    calling the Python tokenizer per text, with identical ids and offsets).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("label masking needs a fast (Rust) tokenizer with offset mapping; this one is slow")
    chats = [i for i, r in enumerate(records) if "messages" in r]
    texts = [i for i, r in enumerate(records) if "messages" not in r]
    out: list[Example | None] = [None] * len(records)
    rendered = [render_with_spans(records[i]["messages"], tokenizer, records[i].get("condition")) for i in chats]
    encodings = tokenizer.backend_tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    for i, (_, spans), enc in zip(chats, rendered, encodings):
        labels = [t if any(a <= s < b for a, b in spans) else IGNORE for t, (s, _) in zip(enc.ids, enc.offsets)]
        out[i] = Example(input_ids=list(enc.ids), labels=labels)
    for i, ids in zip(texts, raw_text_ids([records[i]["text"] for i in texts], tokenizer)):
        out[i] = Example(input_ids=ids, labels=list(ids), divisible=True)
    return out  # type: ignore[return-value]


def raw_text_ids(texts: Sequence[str], tokenizer) -> list[list[int]]:
    """Token ids of raw-text records (continued pretraining): the tokenizer's own special tokens
    (BOS for Llama-style tokenizers, none for GPT-2's), the text, then EOS, so packed documents are
    separated as in pretraining. Every token is trained."""
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    for enc in tokenizer(list(texts))["input_ids"] if texts else []:
        out.append(list(enc) + ([eos] if eos is not None and (not enc or enc[-1] != eos) else []))
    return out


def tokenize_record(record: dict, tokenizer) -> Example:
    """:func:`tokenize_records` for one record."""
    return tokenize_records([record], tokenizer)[0]


@dataclass(frozen=True)
class Packed:
    """Examples packed into rows of equal length (all tensors ``(rows, seq_len)``, int64): in memory,
    or for a streamed stage views of files (:mod:`mixtune.data.packed_files`)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    source_ids: torch.Tensor
    """Index of each token's source (into the caller's source list); -1 on padding."""
    example_ids: torch.Tensor
    """Index of each token's example (into the list given to :func:`pack`); -1 on padding."""
    dropped: int
    truncated: int

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens (counted a few million positions at a time: rows may be mapped
        from disk, :mod:`mixtune.data.packed_files`)."""
        rows, width = self.example_ids.shape
        step = max(1, (1 << 22) // max(1, width))
        return sum(int((self.example_ids[i:i + step] >= 0).sum()) for i in range(0, rows, step))

    @property
    def efficiency(self) -> float:
        """Share of row positions holding real tokens."""
        return self.n_tokens / max(1, self.input_ids.numel())


def pack(examples: Sequence[Example], seq_len: int, *, pad_id: int, sources: Sequence[int] | None = None,
         long_examples: str = "error", where: Sequence[str] | None = None) -> Packed:
    """Pack examples into rows of ``seq_len`` tokens by best fit decreasing.

    A raw-text example (``divisible``) longer than ``seq_len`` is first cut into pieces of
    ``seq_len`` tokens (the last one shorter), each placed like an example of its own.

    Args:
        examples: tokenized examples.
        seq_len: row length.
        pad_id: token id for the unfilled tail of rows.
        sources: per example, the index of its source (default 0).
        long_examples: ``error`` | ``drop`` | ``truncate`` for examples longer than ``seq_len``.
        where: per example, a name for error messages (e.g. ``"data/math.jsonl:12"``); default
            ``example N``, counted from 1.

    Raises:
        DataError: an example is longer than ``seq_len`` and ``long_examples`` is ``error``.
    """
    lengths = np.fromiter((len(ex.input_ids) for ex in examples), dtype=np.int64, count=len(examples))
    plan = plan_rows(lengths, np.fromiter((ex.divisible for ex in examples), dtype=bool, count=len(examples)),
                     seq_len, long_examples=long_examples, where=where)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = {k: np.fromiter(itertools.chain.from_iterable(getattr(ex, k) for ex in examples), dtype=np.int64,
                           count=int(offsets[-1])) for k in ("input_ids", "labels")}

    def gather(ex: np.ndarray, start: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        at = ranges(offsets[ex] + start, n)
        return flat["input_ids"][at], flat["labels"][at]

    sources = np.asarray(sources if sources is not None else np.zeros(len(examples)), dtype=np.int64)
    rows = fill_rows(plan, gather, sources, 0, plan.n_rows, pad_id=pad_id)
    return Packed(**{k: torch.from_numpy(v) for k, v in rows.items()}, dropped=plan.dropped, truncated=plan.truncated)


__all__ = ["IGNORE", "Example", "FormatConfig", "Packed", "pack", "prompt_text", "render_with_spans",
           "tokenize_record", "tokenize_records"]
