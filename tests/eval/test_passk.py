import random
from math import comb

import pytest

from mixtune.core import ConfigError, MixtuneError
from mixtune.eval.passk import mean_pass_at_k, pass_at_k


def test_hand_computed_values():
    # n=5, c=2, k=1: 1 - C(3,1)/C(5,1) = 1 - 3/5 = 0.4 (pass@1 is the fraction correct)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-12)
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-12)
    # n=10, c=3, k=5: 1 - C(7,5)/C(10,5) = 1 - 21/252 = 11/12
    assert pass_at_k(10, 3, 5) == pytest.approx(11 / 12, abs=1e-12)
    assert pass_at_k(5, 0, 3) == 0.0  # nothing passed: C(n,k)/C(n,k) = 1
    assert pass_at_k(5, 4, 2) == 1.0  # n - c = 1 < k = 2: every pair holds a passing sample
    assert pass_at_k(5, 5, 5) == 1.0


def test_mean_over_problems():
    # problems (n=5, c=2), (n=5, c=0), (n=4, c=4) at k=2: (0.7 + 0 + 1) / 3
    assert mean_pass_at_k([5, 5, 4], [2, 0, 4], 2) == pytest.approx(1.7 / 3, abs=1e-12)
    assert mean_pass_at_k(5, [2, 0], 1) == pytest.approx(0.2, abs=1e-12)  # one n for all: (0.4 + 0) / 2


def test_product_form_equals_binomial_formula_on_random_cases():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 30)
        c, k = rng.randint(0, n), rng.randint(1, n)
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k", "words"), [
    (3, 1, 5, "at least k = 5 samples"), (3, 1, 0, "k = 0"), (3, 4, 1, "0 <= c <= n"), (0, 0, 1, "n = 0"),
    (3, -1, 1, "c = -1"), (3, 1, 1.0, "expected an integer"),
])
def test_invalid_counts_are_config_errors(n, c, k, words):
    with pytest.raises(ConfigError, match=words) as err:
        pass_at_k(n, c, k)
    assert isinstance(err.value, MixtuneError)


def test_mean_rejects_mismatched_or_empty_input():
    with pytest.raises(ConfigError, match="2 sample counts for 3 problems"):
        mean_pass_at_k([5, 5], [1, 2, 3], 1)
    with pytest.raises(ConfigError, match="no problems"):
        mean_pass_at_k(5, [], 1)
    with pytest.raises(ConfigError, match="pass@6"):
        mean_pass_at_k([10, 5], [1, 1], 6)
