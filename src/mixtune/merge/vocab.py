"""Vocabularies aligned by token string, as mergekit 0.1.5 aligns them (a merge config's ``tokenizer``).

1. The output tokenizer (mergekit/tokenizer/build.py:193-256). The tokenizer base is the base model,
   else the first model; its tokenizer loses the tokens at or past its ``vocab_size`` (config.json).
   ``source: base`` keeps it; ``source: union`` appends every other token of the models in order
   (their plain tokens first, then their added tokens, the first model's settings winning); a model
   folder takes that tokenizer as it is. Tokens named in ``tokens`` are then added where missing.
2. A row map per model: for each output token, its row in that model (its tokenizer's id, when below
   its ``vocab_size``), or none.
3. Per embedding or head tensor, before the merge method sees it (mergekit/tokenizer/embed.py:74-156):
   each input keeps its own row of every token it has; a token some input lacks (or one with
   ``force``) gets one default row, given to the inputs that lack it (every input, with ``force``):
   its rule's source when ``tokens`` names it, else the one input that has it, else the base's row,
   else the mean of the rows of the inputs that have it (summed in input order), else zeros. With
   ``pad_to_multiple_of`` the rows past the vocabulary are each input's mean row.
4. The tokenizer is saved beside the merged weights, with the chat template set, and config.json's
   ``vocab_size`` is the rows written.

Differences from mergekit, all where mergekit is not deterministic or stops: mergekit visits its
models in set order and each tokenizer's vocabulary in hash order, so the ids it gives the tokens a
union appends (and ``chat_template: auto``'s pick between equally common templates) vary from run to
run; mixtune takes the base, then the models in config order, each by id. A token a model's
tokenizer places past its ``vocab_size`` counts as absent (mergekit fails with a KeyError), and a
rule without a source applies the default rule (mergekit raises NotImplementedError). A token that
``tokens`` adds to the base's vocabulary (``source: base``) is absent from every input; mergekit
adds it to the base's own tokenizer object, so it takes the base's padding row of that id where the
base has one and fails with a KeyError where it has none.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixtune.core import CheckpointError, ConfigError
from mixtune.merge.chat_templates import chat_template_text
from mixtune.merge.config import ModelTokenRow, TokenizerSpec, ZeroRow

LOG = logging.getLogger("mixtune.merge")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
"""Files of a saved tokenizer: removed from the output before the built tokenizer is saved there."""


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), use_fast=True)


def vocab_size(folder: Path) -> int | None:
    """The model's ``vocab_size`` in config.json (None without one), as mergekit reads it
    (mergekit/tokenizer/build.py:38-53)."""
    try:
        c = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    size = c.get("vocab_size", (c.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) else None


def _strip(tok, size: int, where: str):
    """``tok`` without the tokens at ids >= ``size`` (mergekit/tokenizer/build.py:56-118): out of the
    BPE vocabulary, the added tokens and every merge that uses them."""
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    if not getattr(tok, "is_fast", False):
        raise CheckpointError(f"{where}: its tokenizer has tokens past vocab_size {size} and no fast (tokenizers) "
                              "form to remove them from")
    from tokenizers import Tokenizer

    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise CheckpointError(f"{where}: its {spec['model']['type']} tokenizer has tokens past vocab_size {size}; "
                              "only a BPE tokenizer can be cut to it")
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < size]
    spec["model"]["vocab"] = {t: i for t, i in spec["model"]["vocab"].items() if t not in unused}
    pairs = [m.split(" ") if isinstance(m, str) else m for m in spec["model"]["merges"]]
    spec["model"]["merges"] = [m for m, pair in zip(spec["model"]["merges"], pairs) if not unused & set(pair)]
    tok._tokenizer = Tokenizer.from_str(json.dumps(spec))  # transformers' backend object; no public setter
    return tok


def _by_id(vocab: dict[str, int]) -> list[str]:
    return sorted(vocab, key=vocab.__getitem__)


def _union(base, others: list[tuple[object, int]]):
    """A copy of ``base`` (saved and reloaded, as mergekit copies it) with every token of ``others``
    (``(tokenizer, vocab_size)``, the base's first) below its model's vocab_size: the plain ones it
    lacks first, then every added token with the first model's settings (mergekit/tokenizer/build.py:121-184)."""
    from transformers import AutoTokenizer

    plain: dict[str, None] = {}
    added: dict[str, object] = {}
    for tok, size in others:
        vocab = tok.get_vocab()
        plain.update((t, None) for t in _by_id(vocab) if vocab[t] < size)
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if i < size:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    have = base.get_vocab()
    for t in plain:
        if t not in added and t not in have:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class Vocabulary:
    """The output vocabulary and each model's row of every output token."""

    tokenizer: object
    """The output tokenizer (transformers)."""
    count: int
    """Tokens in the output vocabulary (their ids are 0 .. count - 1)."""
    size: int
    """Rows written: ``count`` rounded up to ``pad_to_multiple_of``."""
    rows: dict[Path, torch.Tensor]
    """Per model folder, ``(count,)`` int64: its row of each output token, -1 where it has none."""
    vocabs: dict[Path, dict[str, int]]
    """Each model's tokenizer vocabulary (for ``model_token`` rules)."""
    rules: dict[int, tuple[str, object]]
    """Output id -> (token, its TokenRule) for the tokens ``tokens`` names."""
    here: object
    """Resolves a config path to a model folder (as the keys of ``rows``)."""
    _plans: dict = field(default_factory=dict)

    def plan(self, folders: list[Path], base: Path | None, key: str) -> RowPlan:
        """How tensor ``key`` of the inputs ``folders`` (in the merge's order) is realigned; ``base`` is
        the base's folder (its row wins where several inputs have a token). Cached per inputs.

        Raises:
            ConfigError: a rule's model is not among the inputs, or lacks the token it is asked for.
        """
        cache = (tuple(folders), base)
        if cache not in self._plans:
            self._plans[cache] = self._plan(folders, base, key)
        return self._plans[cache]

    def _plan(self, folders: list[Path], base: Path | None, key: str) -> RowPlan:
        """Which tokens take a default row, and where each comes from: a rule's source, else mergekit's
        choice (mergekit/tokenizer/embed.py:158-193: the one input that has it, the base, the mean,
        zeros); every input keeps its own row of the rest (embed.py:104-148)."""
        rows = torch.stack([self.rows[f] for f in folders])  # (M, count)
        present = rows >= 0
        forced = torch.zeros(self.count, dtype=torch.bool)
        for i, (_, rule) in self.rules.items():
            forced[i] = rule.force
        need = (forced | ~present.all(0)).nonzero().flatten().tolist()
        b = folders.index(base) if base in folders else None
        single: list[tuple[int, int, int]] = []  # (default slot, input, row)
        means: dict[int, list[int]] = {}  # number of inputs averaged -> default slots
        for slot, i in enumerate(need):
            token, rule = self.rules.get(i, (None, None))
            source = rule.source if rule is not None else None
            has = present[:, i].nonzero().flatten().tolist()
            where = f"tokenizer.tokens[{token!r}].source"
            if isinstance(source, ZeroRow):
                continue  # the default rows start as zeros
            if source is not None:
                model = self.here(source.model if isinstance(source, ModelTokenRow) else source)
                if model not in folders:
                    raise ConfigError(f"{where}: {model} is not among the inputs of tensor {key}")
                m = folders.index(model)
                if isinstance(source, ModelTokenRow):
                    row = source.token_id
                    if row is None:
                        if source.token not in self.vocabs.get(model, {}):
                            raise ConfigError(f"{where}.token {source.token!r}: not in {model}'s tokenizer")
                        row = self.vocabs[model][source.token]
                    single.append((slot, m, row))
                elif rows[m, i] < 0:
                    raise ConfigError(f"{where}: {model} has no token {token!r} (take another token's row with "
                                      "{kind: model_token, ...}, or {kind: zero})")
                else:
                    single.append((slot, m, int(rows[m, i])))
            elif len(has) == 1:
                single.append((slot, has[0], int(rows[has[0], i])))
            elif b is not None and b in has:
                single.append((slot, b, int(rows[b, i])))
            elif has:
                means.setdefault(len(has), []).append(slot)
        slot_of = torch.full((self.count,), -1, dtype=torch.long)
        slot_of[need] = torch.arange(len(need))
        copy = [torch.where(present[m] & ~forced, rows[m], -1) for m in range(len(folders))]
        mean_parts = []
        for n, slots in means.items():
            ids = torch.tensor([need[s] for s in slots], dtype=torch.long)
            mean_parts.append((n, torch.tensor(slots), [(m, present[m, ids].nonzero().flatten(), rows[m, ids])
                                                        for m in range(len(folders))]))
        return RowPlan(len(need), slot_of, copy, single, mean_parts, self.size)


@dataclass
class RowPlan:
    """The realignment of one tensor's inputs (see :meth:`Vocabulary.plan`)."""

    defaults: int
    """Number of default rows."""
    slot_of: torch.Tensor
    """``(count,)``: each output token's default row, -1 for none."""
    copy: list[torch.Tensor]
    """Per input, ``(count,)``: the row it keeps for each output token, -1 where it takes the default."""
    single: list[tuple[int, int, int]]
    """Default rows copied from one input: (default row, input, its row)."""
    means: list[tuple[int, torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]]]
    """Default rows that are means of n inputs' rows: (n, default rows, per input (which of them it
    has, its rows of all of them))."""
    size: int
    """Rows of each output."""

    def apply(self, tensors: list[torch.Tensor], labels: list[str], key: str) -> list[torch.Tensor]:
        """Each input realigned to the output vocabulary, in the inputs' promoted dtype (as mergekit's
        PermutedVocabulary computes them, mergekit/tokenizer/embed.py:94-156). Rows are the first dimension.

        Raises:
            CheckpointError: the inputs differ beyond their rows, or a rule's row lies outside its input.
        """
        rest = tensors[0].shape[1:]
        dtype = tensors[0].dtype
        for t, label in zip(tensors, labels):
            dtype = torch.promote_types(dtype, t.dtype)
            if t.shape[1:] != rest:
                raise CheckpointError(f"{label}: tensor {key} has shape {list(t.shape)}, {labels[0]} has "
                                      f"{list(tensors[0].shape)} (only the rows, one per token, may differ)")
        default = torch.zeros((self.defaults, *rest), dtype=dtype)
        for slot, m, row in self.single:
            if not 0 <= row < tensors[m].shape[0]:
                raise CheckpointError(f"{labels[m]}: tensor {key} has {tensors[m].shape[0]} rows; a tokenizer "
                                      f"rule asks for row {row}")
            default[slot] = tensors[m][row]
        for n, slots, parts in self.means:
            acc = torch.zeros((len(slots), *rest), dtype=dtype)
            for m, has, rows in parts:  # in input order, as mergekit sums them
                acc[has] = acc[has] + tensors[m][rows[has]].to(dtype)
            default[slots] = acc / n
        out = []
        for m, t in enumerate(tensors):
            keep = self.copy[m]
            new = torch.empty((self.size, *rest), dtype=dtype)
            count = keep.shape[0]
            torch.index_select(t.to(dtype), 0, keep.clamp(min=0), out=new[:count])  # no gathered copy
            takes = keep < 0
            new[:count][takes] = default[self.slot_of[takes]]
            if self.size > count:  # padding rows: the mean of the real ones (mergekit/tokenizer/embed.py:150-153)
                new[count:] = torch.mean(new[:count], dim=0)
            out.append(new)
        return out


def build_vocabulary(spec: TokenizerSpec, folders: list[Path], here) -> Vocabulary:
    """The output tokenizer and each model's row map; ``folders`` are the models (normalised paths),
    the tokenizer base first; ``here`` resolves a config path as ``folders`` are.

    Raises:
        ConfigError: a rule's model is not a model of the merge, or the vocabulary's ids have gaps.
        CheckpointError: the base's tokenizer cannot be cut to its vocab_size.
    """
    sizes = {f: vocab_size(f) for f in folders}  # each config.json read once
    try:
        base = _strip(_tokenizer(folders[0]), sizes[folders[0]] or 1 << 62, f"model {folders[0]}")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"model {folders[0]}: no tokenizer to align vocabularies with ({e})") from None
    toks = {folders[0]: base}
    for f in folders[1:]:
        try:
            toks[f] = _tokenizer(f)
        except Exception as e:  # noqa: BLE001 - as mergekit (build.py:217-228): taken to be the base's
            LOG.warning("model %s: no tokenizer (%s); taken to be the base's", f, e)
    if spec.source == "base":
        out = base
    elif spec.source == "union":
        out = _union(base, [(toks[f], sizes[f] or len(toks[f].get_vocab())) for f in folders if f in toks])
    else:
        source = here(spec.source)
        try:
            out = _tokenizer(source)
        except (OSError, ValueError) as e:
            raise ConfigError(f"tokenizer.source {spec.source}: no tokenizer there ({e})") from None
    # each model's vocabulary before tokens are added (with source: base, mergekit adds them to the base's
    # own tokenizer object, so that a padding row of the base would pass for the new token's row)
    vocabs = {f: toks.get(f, base).get_vocab() for f in folders}
    for token in spec.tokens:
        if token not in out.get_vocab():
            out.add_tokens(token)
    vocab = out.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ConfigError(f"tokenizer.source {spec.source}: the tokenizer's ids have gaps; rows could not follow them")
    tokens = _by_id(vocab)
    rows = {}
    for f in folders:
        own, limit = vocabs[f], sizes[f] or len(vocabs[f])
        rows[f] = torch.tensor([own.get(t, -1) if own.get(t, -1) < limit else -1 for t in tokens], dtype=torch.long)
    for token, rule in spec.tokens.items():
        model = rule.source.model if isinstance(rule.source, ModelTokenRow) else rule.source
        if isinstance(model, Path) and here(model) not in rows:
            raise ConfigError(f"tokenizer.tokens[{token!r}].source: {model} is not a model of this merge")
    size = len(tokens)
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size += spec.pad_to_multiple_of - size % spec.pad_to_multiple_of
    return Vocabulary(out, len(tokens), size, rows, vocabs, {vocab[t]: (t, r) for t, r in spec.tokens.items()}, here)


def chosen_template(value: str | None, folders: list[Path]) -> str | None:
    """The chat template to set: None to keep the tokenizer's own; for ``auto`` the template most of
    ``folders``' tokenizers have, stripped (ties: the first in ``folders``' order), as
    mergekit/merge.py:155-203 chooses it."""
    if value is None:
        return None
    text = chat_template_text(value)
    if text is not None:
        return text
    found = []
    for f in folders:
        try:
            template = _tokenizer(f).chat_template
        except Exception:  # noqa: BLE001 - as mergekit (merge.py:179-180): a model without a tokenizer has none
            continue
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            found.append(template.strip())
    return Counter(found).most_common(1)[0][0] if found else None


def write_tokenizer(tokenizer, folder: Path, template: str | None) -> None:
    """Save ``tokenizer`` into ``folder`` in place of any tokenizer files there, with ``template`` as its
    chat template when given."""
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))


def reserialize(donor: Path, folder: Path, value: str, folders: list[Path]) -> None:
    """A chat template without ``tokenizer``: ``donor``'s tokenizer loaded and saved with it, as
    mergekit's _copy_tokenizer does then (mergekit/merge.py:276-284)."""
    try:
        tok = _tokenizer(donor)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"model {donor}: no tokenizer to set chat_template {value!r} on ({e})") from None
    write_tokenizer(tok, folder, chosen_template(value, folders))
