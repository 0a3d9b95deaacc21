"""Named random streams: every random choice mixtune makes draws from ``rng(seed, purpose, *indices)``.

A stream is identified by the run's seed, a purpose (``"batch-order"``, ``"masked-thought"``, ...)
and the indices that tell its uses apart (stage, epoch, step, source name). They become one
``numpy.random.SeedSequence`` whose entropy is a fixed-width encoding of all of them, with the
number of indices in front, so two different identities never give the same entropy: no
arithmetic such as ``seed * 1_000_003 + stage * 10_007 + step``, where stage 0 step 10007 and stage 1
step 0 were one stream, and no two purposes sharing ``[seed, stage, i]``. (SeedSequence pads its
entropy with zeros, so ``[a]`` and ``[a, 0]`` would be the same stream: hence the count.)

Values are integers (any sign or size below 2**64 in magnitude) or strings (hashed with SHA-256).
"""

from __future__ import annotations

import hashlib

import numpy as np

Index = int | str


def _words(value: Index) -> list[int]:
    """Two 32-bit words for an integer (two's complement, 64-bit) or a string's hash; one tag word first."""
    if isinstance(value, str):
        tag, v = 1, int.from_bytes(hashlib.sha256(value.encode()).digest()[:8], "big")
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not -2**63 <= int(value) < 2**64:
            raise ValueError(f"stream index {value} does not fit in 64 bits")
        tag, v = 0, int(value) % 2**64
    else:
        raise TypeError(f"a stream index is an int or a str, got {type(value).__name__}")
    return [tag, v & 0xFFFFFFFF, v >> 32]


def seed_sequence(seed: int, purpose: str, *indices: Index) -> np.random.SeedSequence:
    """The ``SeedSequence`` of the stream ``(seed, purpose, *indices)``."""
    entropy = [len(indices), *_words(seed), *_words(purpose)]
    for i in indices:
        entropy += _words(i)
    return np.random.SeedSequence(entropy)


def rng(seed: int, purpose: str, *indices: Index) -> np.random.Generator:
    """A numpy ``Generator`` on the stream ``(seed, purpose, *indices)``."""
    return np.random.default_rng(seed_sequence(seed, purpose, *indices))


def seed_int(seed: int, purpose: str, *indices: Index, bits: int = 32) -> int:
    """A ``bits``-bit integer seed from the stream, for APIs that take one (``accelerate.set_seed``)."""
    words = seed_sequence(seed, purpose, *indices).generate_state(2, np.uint32)
    return (int(words[0]) | int(words[1]) << 32) % 2**bits


def torch_generator(seed: int, purpose: str, *indices: Index):
    """A CPU ``torch.Generator`` seeded from the stream ``(seed, purpose, *indices)``."""
    import torch

    return torch.Generator().manual_seed(seed_int(seed, purpose, *indices, bits=63))
