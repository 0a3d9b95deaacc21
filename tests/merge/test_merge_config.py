"""Reading merge configs: mixtune's form and mergekit's YAML as it is."""

import pytest

from mixtune.core import ConfigError
from mixtune.merge import load_merge_config


def write(tmp_path, text):
    p = tmp_path / "merge.yaml"
    p.write_text(text)
    return p


def test_mergekit_yaml_translates_field_by_field(tmp_path):
    cfg = load_merge_config(write(tmp_path, """
merge_method: ties
base_model: ./base
models:
  - model: ./base            # mergekit lets the base be listed; its task vector is zero and skipped
  - model: ./math
    parameters: {weight: 1.0, density: 0.5}
  - model: ./code
    parameters: {weight: 0.5}
parameters: {density: 0.2, normalize: false, lambda: 0.9, int8_mask: true}
dtype: float32
out_dtype: bfloat16
random_seed: 7
tokenizer_source: base
"""))
    assert cfg.method == "ties" and str(cfg.base_model) == "base"
    assert [(str(m.model), m.weight, m.parameters) for m in cfg.models] == [
        ("math", 1.0, {"density": 0.5}), ("code", 0.5, {"density": 0.2})]  # top-level density is the default
    assert cfg.parameters == {"normalize": False, "lambda": 0.9, "int8_mask": True}
    assert cfg.dtype == "bfloat16" and cfg.seed == 7


@pytest.mark.parametrize("text,match", [
    ("merge_method: ties\nslices: []\nmodels: []\n", "mergekit field 'slices' is not supported"),
    ("merge_method: slerp\nmodels: []\n", "merge_method 'slerp' is not supported.*ties"),
    ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: [0, 1]}\n",
     "per-layer gradients"),
    ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n", "models\\[0\\] \\(a\\) has no weight"),
    ("merge_method: linear\ntokenizer_source: union\nmodels: []\n", "only 'base'"),
])
def test_unsupported_mergekit_fields_are_errors_naming_them(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_merge_config(write(tmp_path, text))


def test_mixtune_form_with_overrides_and_per_model_checks(tmp_path):
    from mixtune.merge.run import resolve

    p = write(tmp_path, "method: ties\nbase_model: b\nmodels:\n  - {model: a, parameters: {density: 0.3}}\n")
    cfg = load_merge_config(p, {"seed": 4, "models.0.weight": 2.0})
    assert cfg.seed == 4 and cfg.models[0].weight == 2.0
    _, _, per_model, base, models = resolve(cfg, tmp_path)
    assert per_model[0].density == 0.3 and base == tmp_path / "b" and models == [tmp_path / "a"]
    bad = load_merge_config(write(tmp_path, "method: ties\nbase_model: b\nmodels:\n  - {model: a, parameters: "
                                            "{densty: 0.3}}\n"))
    with pytest.raises(ConfigError, match=r"models\[0\] \(a\) parameters for ties.*densty"):
        resolve(bad, tmp_path)
    with pytest.raises(ConfigError, match="needs base_model"):
        resolve(load_merge_config(write(tmp_path, "method: ties_paper\nmodels: [{model: a}]\n")), tmp_path)
