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
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from mixtune.core import DataError, Strict
from mixtune.models import CHAT_TEMPLATE

IGNORE = -100
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
    """Examples packed into rows of equal length (all tensors ``(rows, seq_len)``)."""

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
        """Real (non-padding) tokens."""
        return int((self.example_ids >= 0).sum())

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
    sources = list(sources) if sources is not None else [0] * len(examples)
    pieces: list[tuple[int, int]] = []  # (example, first token) of each piece to place
    for i, ex in enumerate(examples):
        cut = ex.divisible and len(ex.input_ids) > seq_len
        pieces.extend((i, start) for start in (range(0, len(ex.input_ids), seq_len) if cut else [0]))
    lengths, dropped, truncated = [], 0, 0
    for i, start in pieces:
        ex = examples[i]
        n = len(ex.input_ids) - start if not ex.divisible else min(seq_len, len(ex.input_ids) - start)
        if n > seq_len:
            if long_examples == "error":
                name = where[i] if where else f"example {i + 1}"
                raise DataError(
                    f"{name} has {n} tokens, longer than seq_len = {seq_len}. Raise format.seq_len, or set "
                    f"format.long_examples to 'drop' or 'truncate'"
                )
            if long_examples == "drop":
                dropped, n = dropped + 1, 0
            else:
                truncated, n = truncated + 1, seq_len
        lengths.append(n)

    # Best fit decreasing. Rows are grouped by remaining space; `spaces` keeps the distinct
    # remaining sizes sorted, so the best row is one bisect away (at most seq_len+1 keys).
    rows: list[list[int]] = []
    by_space: dict[int, list[int]] = {}
    spaces: list[int] = []
    for i in sorted(range(len(pieces)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        if n == 0:
            continue
        k = bisect.bisect_left(spaces, n)
        if k == len(spaces):
            row, space = len(rows), seq_len
            rows.append([])
        else:
            space = spaces[k]
            row = by_space[space].pop()
            if not by_space[space]:
                del by_space[space]
                spaces.pop(k)
        rows[row].append(i)
        left = space - n
        if left > 0:
            if left not in by_space:
                by_space[left] = []
                bisect.insort(spaces, left)
            by_space[left].append(row)

    shape = (len(rows), seq_len)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    source_ids = torch.full(shape, -1, dtype=torch.long)
    example_ids = torch.full(shape, -1, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for k in members:
            (i, start), n = pieces[k], lengths[k]
            sl = slice(at, at + n)
            input_ids[r, sl] = torch.tensor(examples[i].input_ids[start:start + n])
            labels[r, sl] = torch.tensor(examples[i].labels[start:start + n])
            labels[r, at] = IGNORE  # never predict across the boundary with the previous example
            position_ids[r, sl] = torch.arange(n)
            source_ids[r, sl] = sources[i]
            example_ids[r, sl] = i
            at += n
        # Padding forms its own block (positions from 0) so no real token attends to it.
        position_ids[r, at:] = torch.arange(seq_len - at)
    return Packed(input_ids, labels, position_ids, source_ids, example_ids, dropped, truncated)


__all__ = ["IGNORE", "Example", "FormatConfig", "Packed", "pack", "prompt_text", "render_with_spans",
           "tokenize_record", "tokenize_records"]
