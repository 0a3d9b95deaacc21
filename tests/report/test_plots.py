import math

import pytest
from matplotlib.axes import Axes

from mixtune.report import build_report, plots

ABILITIES = ["math", "code", "general"]
SOURCES = ["echo", "arithmetic", "math", "code", "general"]


def rows(n=100, seeds=(0,), amounts=(1.0,)):
    values = {"base": {"math": 0.1, "code": 0.2, "general": 0.3},
              "multi_task": {"math": 0.5, "code": 0.4, "general": 0.9}}
    return [{"run_id": f"{run}|seed={s}|amount={am:g}", "name": run, "amount": am, "seed": s, "ability": a,
             "value": v, "n": n, "higher_is_better": 1, "model_dir": f"models/{run}-key", "link": f"runs/{run}"}
            for s in seeds for am in amounts for run, by in values.items() for a, v in by.items()]


CURVES = {"multi_task": [(step, "1", s, 1.0 / (step + 1)) for step in range(3) for s in SOURCES]}


@pytest.fixture
def drawn(monkeypatch):
    """What every chart drew: (chart kind, label, colour, yerr) per bar series or line."""
    calls = []
    bar, plot = Axes.bar, Axes.plot

    def record_bar(self, x, height, *args, **kw):
        calls.append(("bar", kw.get("label"), kw.get("color"), kw.get("yerr")))
        return bar(self, x, height, *args, **kw)

    def record_plot(self, *args, **kw):
        calls.append(("plot", kw.get("label"), kw.get("color"), None))
        return plot(self, *args, **kw)

    monkeypatch.setattr(Axes, "bar", record_bar)
    monkeypatch.setattr(Axes, "plot", record_plot)
    return calls


def test_one_colour_mapping_in_order_of_first_appearance():
    c = plots.colors([*ABILITIES, *SOURCES])
    assert list(c) == ["math", "code", "general", "echo", "arithmetic"]
    assert c == dict(zip(c, plots.PALETTE))
    # stable whichever names a chart shows: the mapping is made once, from every name
    assert plots.colors(["math", "code", "general"])["general"] == c["general"]


def test_a_figure_is_embedded_as_a_data_uri_with_its_alt_text_escaped():
    import base64

    png = b"\x89PNG\r\n\x1a\n"
    tag = plots.img(png, 'a "b" <c>')
    assert tag == f'<img alt="a &quot;b&quot; &lt;c&gt;" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
    assert base64.b64decode(tag.split("base64,")[1].removesuffix('">')) == png


def test_every_chart_gives_an_ability_the_same_colour(drawn, tmp_path):
    build_report(rows(amounts=(0.5, 1.0)), CURVES, tmp_path / "r.html", title="t", sources=SOURCES,
                 mixing=CURVES)
    bars = {label: color for kind, label, color, _ in drawn if kind == "bar"}
    lines = {label: color for kind, label, color, _ in drawn if kind == "plot" and label in SOURCES}
    scaling = {label.split(" · ")[1]: color for kind, label, color, _ in drawn if kind == "plot" and " · " in label}
    assert set(bars) == set(scaling) == set(ABILITIES) and set(lines) == set(SOURCES)
    for a in ABILITIES:
        assert bars[a] == lines[a] == scaling[a], a
    assert len(set(bars.values())) == 3


def test_abilities_follow_the_studys_order(drawn, tmp_path):
    html = build_report(rows(), {}, tmp_path / "r.html", title="t", abilities=ABILITIES).read_text()
    assert [label for kind, label, *_ in drawn if kind == "bar"] == ABILITIES  # not sorted
    assert "<th>run</th><th>math</th><th>code</th><th>general</th><th>mean</th>" in html


def test_bars_carry_binomial_standard_errors(drawn, tmp_path):
    html = build_report(rows(n=100), {}, tmp_path / "r.html", title="t", abilities=ABILITIES).read_text()
    yerr = {label: e for kind, label, _, e in drawn if kind == "bar"}
    # runs in order base, multi_task; math: 0.1 and 0.5 on 100 problems each
    assert yerr["math"] == pytest.approx([math.sqrt(0.1 * 0.9 / 100), math.sqrt(0.5 * 0.5 / 100)])
    assert yerr["general"] == pytest.approx([math.sqrt(0.3 * 0.7 / 100), 0.03])
    assert "sqrt(p(1-p)/n)" in html


def test_report_shows_the_verdict_and_each_runs_model_folder(tmp_path):
    lines = ["sequential forgets what multi-task keeps: yes (0.50 vs 0.20, 2 SE = 0.13)", "a < b & c"]
    html = build_report(rows(), {}, tmp_path / "r.html", title="t", verdict=lines).read_text()
    assert "<h2>Verdict</h2>" in html
    assert f"<li>{lines[0]}</li>" in html and "<li>a &lt; b &amp; c</li>" in html
    assert "<code>runs/multi_task</code> → <code>models/multi_task-key</code>" in html
    assert "<h2>Verdict</h2>" not in build_report(rows(), {}, tmp_path / "r2.html", title="t").read_text()
