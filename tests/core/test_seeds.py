"""Named random streams: distinct identities give distinct streams, the same one the same stream."""

import numpy as np
import pytest

from mixtune.core.seeds import rng, seed_int, seed_sequence, torch_generator


def test_the_old_schemes_collisions_are_distinct_streams():
    # seed*1_000_003 + stage*10_007 + step made stage 0 step 10007 the stream of stage 1 step 0
    assert seed_int(0, "masked-thought", 0, 10_007) != seed_int(0, "masked-thought", 1, 0)
    # [seed, stage, epoch] (batch order) and [seed, stage, round] (mixing probes) were one stream
    assert not np.array_equal(rng(0, "batch-order", 1, 2).permutation(50), rng(0, "mixing-probes", 1, 2).permutation(50))
    # SeedSequence pads with zeros: [a] and [a, 0] would be one stream without the index count
    assert seed_int(3, "x") != seed_int(3, "x", 0) != seed_int(3, "x", 0, 0)
    assert seed_int(0, "x", 2**32) != seed_int(0, "x", 0, 1)  # fixed-width words, not variable ones
    assert seed_int(0, "x", "1") != seed_int(0, "x", 1)  # a string index is not the number it spells


def test_no_collisions_over_a_grid_and_the_same_identity_repeats():
    seen = {seed_int(seed, purpose, stage, step, bits=64)
            for seed in range(3) for purpose in ("batch-order", "stage", "mixture")
            for stage in range(4) for step in range(50)}
    assert len(seen) == 3 * 3 * 4 * 50
    a, b = rng(7, "batch-order", 2, 3).random(4), rng(7, "batch-order", 2, 3).random(4)
    assert np.array_equal(a, b)
    assert torch_generator(7, "p", 1).initial_seed() == torch_generator(7, "p", 1).initial_seed() == seed_int(7, "p", 1, bits=63)
    # the entropy is the documented encoding: count, then (tag, low word, high word) per value
    assert seed_sequence(5, "p", 1).entropy == [1, 0, 5, 0, *seed_sequence(0, "p").entropy[4:7], 0, 1, 0]


@pytest.mark.parametrize("bad", [1.5, None, True, 2**64])
def test_an_index_is_an_int_or_a_str(bad):
    with pytest.raises((TypeError, ValueError)):
        seed_int(0, "x", bad)
