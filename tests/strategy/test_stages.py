import pytest
from pydantic import TypeAdapter

from mixtune.core import ConfigError
from mixtune.data.mixture import plan_counts
from mixtune.strategy import STRATEGIES, StageConfig, StrategyConfig, plan_stages

SIZES = {"math": 400, "code": 100, "general": 1000}
SOURCES = list(SIZES)


def counts(strategy: dict) -> list[tuple[str, dict[str, int]]]:
    cfg = TypeAdapter(StrategyConfig).validate_python(strategy)
    return [(st.name, plan_counts(st.mixture, SIZES)) for st in plan_stages(cfg, SOURCES)]


def test_registered_strategies_cite_the_paper():
    assert STRATEGIES.names() == ["multi_task", "sequential", "mixed_sequential", "dmt", "post_sft"]


def test_post_sft_is_sft_then_the_objective_on_the_prompt_sources():
    from mixtune.core import ConfigError
    from mixtune.strategy import plan_stages
    from mixtune.strategy.stages import PostSftParams

    stages = plan_stages(PostSftParams(sft=["math", "code"], prompts=["math"], objective={"name": "grpo"}, steps=5,
                                       lr=1e-5), ["math", "code", "general"])
    assert [(s.name, list(s.mixture.sources)) for s in stages] == [("1-math+code", ["math", "code"]),
                                                                  ("2-grpo", ["math"])]
    assert stages[0].objective is None and stages[1].objective.name == "grpo"
    assert (stages[1].steps, stages[1].lr) == (5, 1e-5)
    assert [s.name for s in plan_stages(PostSftParams(sft=["math"]), ["math"])] == ["1-math"]
    with pytest.raises(ConfigError, match="names chat, not sources"):
        plan_stages(PostSftParams(sft=["math"], prompts=["chat"], objective={"name": "rft"}), ["math"])


def test_multi_task_is_one_stage_of_everything():
    assert counts({"name": "multi_task"}) == [("multi_task", SIZES)]


def test_sequential_one_stage_per_source_in_order():
    assert counts({"name": "sequential"}) == [("1-math", {"math": 400}), ("2-code", {"code": 100}),
                                              ("3-general", {"general": 1000})]
    assert counts({"name": "sequential", "order": ["code", "math"]}) == [("1-code", {"code": 100}),
                                                                          ("2-math", {"math": 400})]


def test_mixed_sequential_specialists_then_general():
    assert counts({"name": "mixed_sequential"}) == [("1-specialists", {"math": 400, "code": 100}),
                                                    ("2-general", {"general": 1000})]


def test_dmt_replays_floor_k_of_each_specialist():
    # k = 1/4: floor(400/4) = 100 math, floor(100/4) = 25 code, with all 1000 general
    assert counts({"name": "dmt", "k": 0.25}) == [("1-specialists", {"math": 400, "code": 100}),
                                                  ("2-general+k=0.25", {"general": 1000, "math": 100, "code": 25})]
    # the paper's k = 1/256: floor(400/256) = 1, floor(100/256) = 0
    assert counts({"name": "dmt"})[1][1] == {"general": 1000, "math": 1, "code": 0}
    # k = 0 is mixed sequential
    assert counts({"name": "dmt", "k": 0})[1][1] == {"general": 1000}


def test_strategy_errors_name_the_problem():
    with pytest.raises(ConfigError, match="strategy.general = 'chat' is not a source; sources: math, code, general"):
        counts({"name": "dmt", "general": "chat"})
    with pytest.raises(ConfigError, match="strategy.order names physics"):
        counts({"name": "sequential", "order": ["physics"]})
    with pytest.raises(ConfigError, match="repeats a source"):
        counts({"name": "sequential", "order": ["math", "math"]})
    with pytest.raises(Exception, match="does not match any of the expected tags"):
        TypeAdapter(StrategyConfig).validate_python({"name": "dmtt"})


def test_stage_config_rules():
    with pytest.raises(Exception, match="at most one of steps and epochs"):
        StageConfig(name="a", mixture={"sources": {"m": None}}, steps=3, epochs=1)
    with pytest.raises(Exception, match="names a folder"):
        StageConfig(name="a/b", mixture={"sources": {"m": None}})
