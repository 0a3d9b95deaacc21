"""Standard errors and paired tests on per-problem scores, by hand; the verdict's and the report's use of them."""

import math

import pytest

from mixtune.report import build_report, dmt_verdict, mcnemar, mcnemar_p, paired_bootstrap, paired_test, standard_error
from mixtune.report.html import paired_rows


def test_standard_error_by_hand():
    # 0/1 scores: binomial, p = 3/5, sqrt(p(1-p)/n) = sqrt(0.24 / 5) = 0.21909
    assert standard_error([1, 0, 0, 1, 1]) == pytest.approx(math.sqrt(0.24 / 5))
    assert standard_error([1, 1, 1]) == 0.0
    # other scores: sample standard error; mean 0.5, s^2 = (0 + .25 + .25) / (3 - 1) = 0.25, se = sqrt(.25 / 3)
    assert standard_error([0.5, 1.0, 0.0]) == pytest.approx(math.sqrt(0.25 / 3))  # 0.288675
    assert math.isnan(standard_error([0.5])) and math.isnan(standard_error([]))


def test_mcnemar_exact_p_by_hand():
    # b = 5, c = 0: n = 5, min = 0: p = 2 * C(5,0) / 2^5 = 2 / 32
    assert mcnemar_p(5, 0) == mcnemar_p(0, 5) == 0.0625
    # b = 6, c = 2: n = 8: p = 2 * (C(8,0) + C(8,1) + C(8,2)) / 2^8 = 2 * (1 + 8 + 28) / 256 = 74 / 256
    assert mcnemar_p(6, 2) == 0.2890625
    # b = c: the tail holds at least half the mass, p capped at 1; no discordant problems: 1
    assert mcnemar_p(3, 3) == mcnemar_p(0, 0) == 1.0
    # b = 9, c = 0: 2 / 2^9
    assert mcnemar_p(9, 0) == pytest.approx(0.00390625)


def test_mcnemar_counts_the_discordant_problems():
    first = [1, 1, 1, 0, 0, 1]
    second = [0, 0, 1, 0, 1, 1]
    # first right, second wrong at 0 and 1 (b = 2); the opposite at 4 (c = 1): n = 3,
    # p = 2 * (C(3,0) + C(3,1)) / 8 = 1
    r = mcnemar(first, second)
    assert (r.b, r.c, r.p) == (2, 1, 1.0)
    assert mcnemar([1] * 5, [0] * 5).p == 0.0625
    with pytest.raises(ValueError, match="0/1"):
        mcnemar([0.5, 1], [1, 0])
    with pytest.raises(ValueError, match="same problems"):
        mcnemar([1, 0], [1])


def test_paired_bootstrap_by_hand():
    same = paired_bootstrap([1, 0, 1], [1, 0, 1], resamples=500)
    # every difference is 0: every resampled mean is 0, |0 - 0| >= 0 always: p = (1 + B) / (B + 1)
    assert (same.diff, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0)
    better = paired_bootstrap([1] * 4, [0] * 4, resamples=999)
    # every difference is 1: every resampled mean is 1, never |1 - 1| >= 1: p = 1 / (999 + 1)
    assert (better.diff, better.low, better.high) == (1.0, 1.0, 1.0) and better.p == pytest.approx(1 / 1000)
    # d = (1, 0), mean 0.5: resampled means 0, 0.5, 1 with probability 1/4, 1/2, 1/4; |m - 0.5| >= 0.5
    # with probability 1/2, so p -> 0.5; the 95% percentile interval is [0, 1]
    half = paired_bootstrap([1, 0], [0, 0], resamples=10_000, seed=3)
    assert half.diff == 0.5 and (half.low, half.high) == (0.0, 1.0) and half.p == pytest.approx(0.5, abs=0.02)
    assert paired_bootstrap([1, 0], [0, 0], resamples=10_000, seed=3) == half  # seeded
    with pytest.raises(ValueError, match="same problems"):
        paired_bootstrap([], [])


def test_paired_test_is_mcnemar_for_binary_scores_else_the_bootstrap():
    assert paired_test([1] * 5, [0] * 5) == ("McNemar", 0.0625)
    test, p = paired_test([0.5, 1.0, 0.25], [0.5, 1.0, 0.25], resamples=100)
    assert test == "paired bootstrap" and p == 1.0


SCORES = {
    "multi_task": {"math": 0.6, "code": 0.4, "general": 0.5},
    "sequential": {"math": 0.3, "code": 0.1, "general": 0.5},
    "mixed_sequential": {"math": 0.3, "code": 0.3, "general": 0.5},
    "dmt(k=0.125)": {"math": 0.4, "code": 0.3, "general": 0.2},
}


def ones(k: int, n: int = 10) -> list[float]:
    return [1.0] * k + [0.0] * (n - k)


# per-problem scores on 10 problems per ability, matching SCORES
ITEMS = {run: {a: ones(round(10 * v)) for a, v in by.items()} for run, by in SCORES.items()}


def test_verdict_lines_carry_the_paired_p_value():
    lines = dmt_verdict(SCORES, 10, items=ITEMS)
    # multi-task vs sequential, math and code pooled: math 6 vs 3 right (problems 3-5: b = 3), code 4 vs 1
    # (problems 1-3: b = 3), c = 0: p = 2 / 2^6 = 0.03125. 2 SE: sqrt((.25 + .16) / 20) * 2 = 0.286
    assert lines[1] == ("sequential forgets what multi-task keeps: yes (0.50 vs 0.20, 2 SE = 0.29) "
                        "(McNemar p = 0.0312)")
    # DMT vs mixed-sequential: math 4 vs 3 (b = 1), code 3 vs 3 (none): p = min(1, 2 * 1 / 2) = 1.
    # 2 SE: sqrt((.2275 + .21) / 20) * 2 = 0.296
    assert lines[2].endswith("not distinguishable from noise (0.35 vs 0.30, 2 SE = 0.30) (McNemar p = 1)")
    # general, mixed-sequential 5 vs DMT 2: b = 3, c = 0: p = 2 / 8 = 0.25. 2 SE: sqrt(.41 / 10) * 2 = 0.405
    assert lines[3] == "while keeping general ability: yes (0.50 vs 0.20, 2 SE = 0.40) (McNemar p = 0.25)"
    # without per-problem scores of both runs, the lines are as before
    partial = {k: v for k, v in ITEMS.items() if k != "sequential"}
    assert dmt_verdict(SCORES, 10, items=partial)[1] == ("sequential forgets what multi-task keeps: yes "
                                                         "(0.50 vs 0.20, 2 SE = 0.29)")
    assert dmt_verdict(SCORES, 10) == [line.split(" (McNemar")[0] for line in lines]


def report_rows():
    values = {"base": {"math": 0.0, "code": 0.2}, "tuned": {"math": 0.6, "code": 0.2}}
    return [{"run_id": f"{run}|seed=0|amount=1", "name": run, "amount": 1.0, "seed": 0, "ability": a, "value": v,
             "se": standard_error(ones(round(5 * v), 5)), "n": 5, "higher_is_better": 1}
            for run, by in values.items() for a, v in by.items()]


def test_report_shows_standard_errors_and_paired_comparisons_with_the_base(tmp_path):
    items = {"base": {"math": ones(0, 5), "code": ones(1, 5)}, "tuned": {"math": ones(3, 5), "code": ones(1, 5)}}
    rows = paired_rows(items, ["base", "tuned"], ["math", "code"])
    # math: 3 vs 0 right, b = 3, c = 0: p = 2 / 8; code: the same answers, p = 1, difference exactly 0
    assert [(r["ability"], r["test"], r["p"], r["n"]) for r in rows] == [("math", "McNemar", 0.25, 5),
                                                                         ("code", "McNemar", 1.0, 5)]
    assert rows[0]["diff"] == pytest.approx(0.6) and rows[0]["low"] <= 0.6 <= rows[0]["high"]
    assert (rows[1]["diff"], rows[1]["low"], rows[1]["high"]) == (0.0, 0.0, 0.0)

    html = build_report(report_rows(), {}, tmp_path / "r.html", title="t", abilities=["math", "code"],
                        items=items).read_text()
    # tuned math: p = 0.6 on 5 problems, se = sqrt(.24 / 5) = 0.219
    assert "<td>0.600 ± 0.219</td>" in html and "± standard error over the problems" in html
    assert "<h2>Paired comparisons with the base</h2>" in html
    assert ("<tr><td>tuned</td><td>math</td><td>0.600</td><td>0.000</td><td class='pos'>+0.600</td>" in html
            and "<td>McNemar</td><td>0.25</td><td>5</td></tr>" in html)
    plain = build_report(report_rows(), {}, tmp_path / "p.html", title="t").read_text()
    assert "Paired comparisons" not in plain  # no per-problem scores, no paired table


def test_a_report_without_scores_says_so(tmp_path):
    html = build_report([], {}, tmp_path / "r.html", title="old study", notes=["a note"]).read_text()
    assert "<title>old study</title>" in html and "No scores yet" in html and "a note" in html


def test_the_eval_table_has_a_standard_error_column(tiny_dir, capsys, monkeypatch):
    import sys

    from mixtune.cli import main

    monkeypatch.setattr(sys, "argv", ["mixtune", "eval", str(tiny_dir), "--abilities", "math", "--n", "2"])
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "ability" in line)
    assert [c.strip() for c in header.strip("┃").split("┃")] == ["ability", "accuracy", "se", "n"]
    (row,) = [line for line in lines if line.startswith("│")]
    _, accuracy, se, n = [c.strip() for c in row.strip("│").split("│")]
    p = float(accuracy)
    assert n == "2" and float(se) == pytest.approx(math.sqrt(p * (1 - p) / 2), abs=1e-3)
