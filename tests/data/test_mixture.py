import math

import pytest

from mixtune.core import ConfigError, validate
from mixtune.data.mixture import MixtureConfig, mix, plan_counts

SIZES = {"a": 1000, "b": 300, "c": 50}


def cfg(**kw) -> MixtureConfig:
    return validate(MixtureConfig, kw)


def pools(sizes=SIZES):
    return {n: [{"messages": [], "i": i, "src": n} for i in range(k)] for n, k in sizes.items()}


def test_default_takes_everything():
    assert plan_counts(cfg(sources={"a": None, "b": {}, "c": None}), SIZES) == SIZES


def test_count_and_fraction_as_the_table_says():
    # fraction is floored: 0.125 * 300 = 37.5 -> 37 ; 1/3 * 50 = 16.67 -> 16
    counts = plan_counts(cfg(sources={"a": {"count": 10}, "b": {"fraction": 0.125}, "c": {"fraction": 1 / 3}}), SIZES)
    assert counts == {"a": 10, "b": 37, "c": 16}


def test_shares_with_total_use_largest_remainder():
    # 0.5*101 = 50.5, 0.3*101 = 30.3, 0.2*101 = 20.2 -> floors 50, 30, 20 (sum 100);
    # the one missing example goes to the largest fractional part (a: .5)
    counts = plan_counts(cfg(sources={"a": {"share": 0.5}, "b": {"share": 0.3}, "c": {"share": 0.2}}, total=101), SIZES)
    assert counts == {"a": 51, "b": 30, "c": 20}


def test_shares_without_total_take_the_largest_mix_no_source_repeats():
    # T = min(1000/0.5, 300/0.3, 50/0.2) = min(2000, 1000, 250) = 250
    counts = plan_counts(cfg(sources={"a": {"share": 0.5}, "b": {"share": 0.3}, "c": {"share": 0.2}}), SIZES)
    assert counts == {"a": 125, "b": 75, "c": 50}


def test_temperature_shares():
    # t = 2: weights sqrt(1000), sqrt(300), sqrt(50) = 31.62, 17.32, 7.07 -> shares .5645, .3092, .1262;
    # x 300 = 169.35, 92.76, 37.87 -> floors 169, 92, 37 (298); +1 to c (.87) and b (.76)
    counts = plan_counts(cfg(sources={"a": None, "b": None, "c": None}, temperature=2, total=300), SIZES)
    w = {n: math.sqrt(s) for n, s in SIZES.items()}
    z = sum(w.values())
    assert counts == {"a": 169, "b": 93, "c": 38}
    assert all(abs(counts[n] - 300 * w[n] / z) < 1 for n in SIZES)
    # without a total: the largest mix where no source repeats (c binds: 50 / .1262 = 396)
    assert sum(plan_counts(cfg(sources={"a": None, "b": None, "c": None}, temperature=2), SIZES).values()) == 396
    # t = 1 keeps natural proportions
    assert plan_counts(cfg(sources={"a": None, "b": None}, temperature=1, total=130), SIZES) == {"a": 100, "b": 30}


def test_mix_takes_exact_counts_distinct_without_replacement():
    m = mix(cfg(sources={"a": {"count": 400}, "b": {"fraction": 0.5}, "c": None}), pools(), seed=0)
    by = {n: [r for r in m.records if r["source"] == n] for n in SIZES}
    assert [len(by[n]) for n in SIZES] == [400, 150, 50]
    assert len({r["i"] for r in by["a"]}) == 400
    assert all(r["src"] == r["source"] for r in m.records)
    assert [(o.source, o.available, o.taken, o.distinct) for o in m.outcomes] == [
        ("a", 1000, 400, 400), ("b", 300, 150, 150), ("c", 50, 50, 50)]


def test_replacement_allows_more_than_available():
    m = mix(cfg(sources={"c": {"count": 500, "replace": True}}), pools(), seed=0)
    assert len(m.records) == 500
    assert m.outcomes[0].distinct <= 50
    m = mix(cfg(sources={"c": {"fraction": 2.0, "replace": True}}), pools(), seed=0)
    assert len(m.records) == 100


def test_deterministic_and_sources_independent():
    c = cfg(sources={"a": {"count": 100}, "b": {"count": 100}})
    m1, m2 = mix(c, pools(), seed=5), mix(c, pools(), seed=5)
    assert m1.records == m2.records
    assert mix(c, pools(), seed=6).records != m1.records
    # adding source c does not change what is taken from a
    m3 = mix(cfg(sources={"a": {"count": 100}, "b": {"count": 100}, "c": {"count": 10}}), pools(), seed=5)
    assert sorted(r["i"] for r in m3.records if r["source"] == "a") == sorted(
        r["i"] for r in m1.records if r["source"] == "a")


@pytest.mark.parametrize("spec, sizes, expected", [
    ({"sources": {"a": {"share": 0.5}, "b": {"share": 0.4}}}, SIZES, "shares must sum to 1, got 0.9"),
    ({"sources": {"a": {"share": 0.5}, "b": {"count": 3}}}, SIZES, "every source needs one .missing: b"),
    ({"sources": {"a": {"count": 1, "fraction": 0.5}}}, SIZES, "at most one of count, fraction, share"),
    ({"sources": {"a": {"count": 3}}, "total": 10}, SIZES, "`total` applies to share or temperature"),
    ({"sources": {"a": {"count": 3}}, "temperature": 2}, SIZES, "with `temperature`, leave out"),
    ({"sources": {}}, SIZES, "at least one source"),
    ({"sources": {"a": {"count": -1}}}, SIZES, "greater than or equal to 0"),
])
def test_invalid_mixtures_are_config_errors(spec, sizes, expected):
    with pytest.raises(ConfigError, match=expected):
        cfg(**spec)


def test_impossible_requests_are_errors_never_clipped():
    with pytest.raises(ConfigError, match="source 'c': 51 examples asked but it has 50.*replace: true"):
        plan_counts(cfg(sources={"c": {"count": 51}}), SIZES)
    with pytest.raises(ConfigError, match="source 'b': 600 examples asked but it has 300"):
        plan_counts(cfg(sources={"b": {"fraction": 2.0}}), SIZES)
    with pytest.raises(ConfigError, match="source 'c': 100 examples asked but it has 50"):
        plan_counts(cfg(sources={"a": {"share": 0.5}, "c": {"share": 0.5}}, total=200), SIZES)
    with pytest.raises(ConfigError, match="unknown source.s. z; defined: a, b, c"):
        plan_counts(cfg(sources={"z": None}), SIZES)
