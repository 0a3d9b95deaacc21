import pytest

from mixtune.report import deltas, mean_scores


def test_deltas_against_base_and_best_specialist_by_hand():
    scores = {
        "base": {"math": 0.10, "code": 0.05},
        "specialist:math": {"math": 0.90, "code": 0.10},
        "specialist:code": {"math": 0.20, "code": 0.60},
        "sequential": {"math": 0.30, "code": 0.50},
    }
    d = deltas(scores, {"math": True, "code": True})
    # sequential math: 0.30 - 0.10 = +0.20 vs base; 0.30 - 0.90 (best specialist: math) = -0.60
    assert d["sequential"]["math"]["vs_base"] == pytest.approx(0.20)
    assert d["sequential"]["math"]["vs_specialist"] == pytest.approx(-0.60)
    assert d["sequential"]["math"]["specialist"] == "specialist:math"
    # code: best specialist is specialist:code (0.60): 0.50 - 0.60 = -0.10; vs base 0.45
    assert d["sequential"]["code"]["vs_specialist"] == pytest.approx(-0.10)
    assert d["sequential"]["code"]["vs_base"] == pytest.approx(0.45)


def test_lower_is_better_metrics_flip_sign():
    d = deltas({"base": {"ppl": 10.0}, "run": {"ppl": 8.0}}, {"ppl": False})
    assert d["run"]["ppl"]["vs_base"] == pytest.approx(2.0)  # perplexity fell by 2: a gain
    assert d["run"]["ppl"]["vs_specialist"] is None  # no specialists


def test_mean_scores_over_seeds():
    rows = [{"name": "a", "amount": 1.0, "ability": "math", "value": v} for v in (0.2, 0.4)]
    (mean, std, n), = mean_scores(rows)[("a", 1.0)].values()
    assert mean == pytest.approx(0.3) and std == pytest.approx(0.1414, abs=1e-4) and n == 2
