"""The built-in model: a small Llama-architecture causal LM and a tokenizer trained locally.

Nothing is downloaded. The tokenizer is a byte-level BPE (every byte is a token,
so any text encodes) trained with the ``tokenizers`` library on a corpus the
caller gives; digits are always single tokens, which tiny models need to learn
arithmetic (shared/NOTES.md). Role markers and the end-of-turn token are special
tokens. Both are saved as an ordinary Hugging Face directory that
``AutoModelForCausalLM`` and ``AutoTokenizer`` load.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mixtune.core import atomic_dir, atomic_write_text

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [BOS, EOS, PAD, *(f"<|{r}|>" for r in ROLES)]

# The chat format of the built-in tokenizer, also mixtune's default for tokenizers
# that have no template of their own (mixtune.data.format). One turn renders as
#   <|user|>\n{content}<|end|>\n
# and generation starts after "<|assistant|>\n". The end-of-turn token doubles as
# EOS, so generation stops where an assistant turn ends.
CHAT_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token or '' }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinySize:
    """Shape of a built-in model (Llama architecture, tied input/output embeddings)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int = 512
    max_position_embeddings: int = 1024


SIZES: dict[str, TinySize] = {
    "tiny": TinySize(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),  # ~1.1M
    "small": TinySize(hidden_size=384, num_hidden_layers=8, num_attention_heads=6, intermediate_size=1024),  # ~14M
}


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with single-digit tokens on ``corpus``.

    Training is deterministic: the same corpus gives the same vocabulary and merges.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # batched generation pads on the left
    )


def init_tiny(out_dir: str | os.PathLike, *, size: str = "tiny", corpus: Iterable[str], seed: int = 0,
              overwrite: bool = False) -> Path:
    """Write a freshly initialised built-in model and its tokenizer to ``out_dir``.

    Args:
        out_dir: folder to create (written atomically: complete or absent).
        size: a key of :data:`SIZES`.
        corpus: text the tokenizer is trained on.
        seed: weight initialisation seed.
        overwrite: replace an existing folder.

    Returns:
        The folder, loadable with ``from_pretrained``.
    """
    if size not in SIZES:
        from mixtune.core import UnknownNameError

        raise UnknownNameError(f"unknown model size {size!r}; available: {', '.join(SIZES)}")
    shape = SIZES[size]
    tokenizer = build_tokenizer(corpus, vocab_size=shape.vocab_size)
    config = LlamaConfig(
        **asdict(shape) | {"vocab_size": len(tokenizer)},
        num_key_value_heads=shape.num_attention_heads,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        from mixtune import __version__

        atomic_write_text(
            tmp / "mixtune.yaml",
            f"# written by mixtune {__version__}\nbuiltin_model:\n  size: {size}\n  seed: {seed}\n",
        )
    return Path(out_dir)
