import math

import pytest

from mixtune.report import binomial_se, dmt_verdict
from mixtune.report.verdict import QUICK

SCORES = {
    "multi_task": {"math": 0.6, "code": 0.4, "general": 0.5},  # math+code mean 0.50
    "sequential": {"math": 0.3, "code": 0.1, "general": 0.5},  # 0.20
    "mixed_sequential": {"math": 0.3, "code": 0.3, "general": 0.5},  # 0.30
    "dmt(k=0.125)": {"math": 0.4, "code": 0.3, "general": 0.2},  # 0.35
    "dmt(k=0.03125)": {"math": 0.2, "code": 0.2, "general": 0.3},  # 0.20
}


def test_binomial_standard_error_by_hand():
    assert binomial_se(0.3, 100) == pytest.approx(math.sqrt(0.21 / 100))  # 0.0458
    assert binomial_se(0.0, 20) == 0.0 and binomial_se(0.5, 0) == 0.0


def test_demo_verdict_numbers_by_hand():
    lines = dmt_verdict(SCORES, 50)
    assert lines[0] == ("specialist accuracy (math, code mean): multi-task 0.50, sequential 0.20, "
                        "mixed-sequential 0.30, DMT k=1/32 0.20, DMT k=1/8 0.35")
    # 0.50 vs 0.20 on 2n = 100 problems: SE = sqrt((.25 + .16) / 100) = 0.0640; 0.30 > 2 SE = 0.128
    assert lines[1] == "sequential forgets what multi-task keeps: yes (0.50 vs 0.20, 2 SE = 0.13)"
    # 0.35 vs 0.30: SE = sqrt((.2275 + .21) / 100) = 0.0661; 0.05 < 2 SE = 0.132
    assert lines[2] == ("DMT (k=1/8) recovers part of what mixed-sequential loses: not distinguishable from noise "
                        "(0.35 vs 0.30, 2 SE = 0.13)")
    # general, n = 50: 0.50 vs 0.20, SE = sqrt((.25 + .16) / 50) = 0.0906; 0.30 > 2 SE = 0.181: lost
    assert lines[3] == "while keeping general ability: NO (0.50 vs 0.20, 2 SE = 0.18)"
    assert len(lines) == 4
    flipped = SCORES | {"sequential": {"math": 0.9, "code": 0.9, "general": 0.5}}  # 0.90 vs 0.50
    assert dmt_verdict(flipped, 50)[1].startswith("sequential forgets what multi-task keeps: NO, the opposite (0.50")


def test_merged_specialists_are_compared_with_sequential_training_and_dmt_by_hand():
    merged = SCORES | {"ties": {"math": 0.5, "code": 0.3, "general": 0.4},   # 0.40
                       "lines": {"math": 0.2, "code": 0.2, "general": 0.4}}  # 0.20
    lines = dmt_verdict(merged, 50)
    assert lines[0].endswith("DMT k=1/8 0.35, TIES merge 0.40, LiNeS merge 0.20")
    # 0.40 vs 0.20: SE = sqrt((.24 + .16) / 100) = 0.0632; 0.20 > 2 SE = 0.126
    assert lines[4] == ("merging the specialists (TIES) keeps more of them than sequential training: yes "
                        "(0.40 vs 0.20, 2 SE = 0.13)")
    # 0.40 vs 0.35: SE = sqrt((.24 + .2275) / 100) = 0.0684; 0.05 < 2 SE = 0.137
    assert lines[5] == "  ... than DMT (k=1/8): not distinguishable from noise (0.40 vs 0.35, 2 SE = 0.14)"
    # LiNeS 0.20 vs DMT 0.35: SE = sqrt((.16 + .2275) / 100) = 0.0622; 0.15 > 2 SE = 0.124: the opposite
    assert lines[6].endswith("sequential training: not distinguishable from noise (0.20 vs 0.20, 2 SE = 0.11)")
    assert lines[7] == "  ... than DMT (k=1/8): NO, the opposite (0.20 vs 0.35, 2 SE = 0.12)"
    assert len(lines) == 8


def test_quick_demo_has_no_verdict():
    zeros = {r: {"math": 0.0, "code": 0.0, "general": 0.0} for r in SCORES}
    lines = dmt_verdict(zeros, 20, quick=True)
    assert lines[-1] == QUICK == ("--quick: stages too short for a verdict; run `mixtune demo` for the real "
                                  "comparison")
    assert len(lines) == 2 and not any("yes" in line or "NO" in line for line in lines)


def test_no_verdict_without_the_demo_runs():
    assert dmt_verdict({"base": {"math": 0.1, "code": 0.1, "general": 0.1}}, 10) == []


def test_demo_prints_and_reports_no_verdict_when_quick(monkeypatch, tmp_path):
    """`mixtune demo --quick` hands the verdict its quick flag: the terminal says there is none."""
    import io
    import os

    from rich.console import Console

    from mixtune import cli

    seen = {}

    def fake_run_study(cfg, out, base_dir, *, title, notes, verdict=None, jobs=1):
        seen["jobs"] = jobs
        seen["lines"] = verdict({r: {"math": 0.0, "code": 0.0, "general": 0.0} for r in SCORES}, {})
        return None, {}, seen["lines"]

    monkeypatch.setattr(cli, "_run_study", fake_run_study)
    monkeypatch.setattr(cli, "console", Console(file=(buf := io.StringIO()), width=200, soft_wrap=True))
    cli.demo(out=tmp_path, quick=True, dry_run=False)
    assert seen["jobs"] == min(2, os.cpu_count() or 1)  # two steps at a time where there are 2 cores
    assert seen["lines"][-1] == QUICK
    assert QUICK in buf.getvalue() and "yes (0.00 vs 0.00" not in buf.getvalue()
