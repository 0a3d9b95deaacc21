"""The report's "why" section: the rows it reads."""

from mixtune.report.why import paired_scores


def test_paired_scores_are_the_two_means_and_mcnemar_on_the_same_problems():
    # problems 0 and 3 solved plain, lost under the other prompt: b = 2 discordant, c = 0, so
    # McNemar's exact p = 2 * C(2, 0) / 2^2 = 0.5
    row = paired_scores([1, 1, 0, 1], [0, 1, 0, 0])
    assert row == {"plain": 0.75, "conjugate": 0.25, "p": 0.5, "test": "McNemar", "n": 4}
    assert list(row) == ["plain", "conjugate", "p", "test", "n"]  # the order the stored JSON keeps
    assert list(paired_scores([1, 0], [1, 0], "mitigated")) == ["plain", "mitigated", "p", "test", "n"]
