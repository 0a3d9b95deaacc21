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
        ("math", 1.0, {"density": 0.5}), ("code", 0.5, {})]
    # the top-level density stays there: the default of every model that sets none (mergekit's precedence)
    assert cfg.parameters == {"density": 0.2, "normalize": False, "lambda": 0.9, "int8_mask": True}
    assert cfg.dtype == "float32" and cfg.out_dtype == "bfloat16" and cfg.seed == 7
    # aligned by token string as mergekit does, not cut by row
    assert cfg.tokenizer.source == "base" and cfg.tokenizer.tokens == {} and cfg.vocab == "error"
    from mixtune.merge.run import resolve

    _, params, per_model, _, _ = resolve(cfg, tmp_path)
    assert [p.density for p in per_model] == [0.5, 0.2] and params.lambda_ == 0.9


@pytest.mark.parametrize("text,match", [
    ("merge_method: ties\nmodules: {}\nmodels: []\n", "mergekit field 'modules' is not supported"),
    ("merge_method: sterp\nmodels: []\n", "merge_method 'sterp' is not supported.*slerp"),
    ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n", "models\\[0\\] \\(a\\) has no weight"),
    ("merge_method: slerp\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1}\n", "slerp takes no weights"),
    ("merge_method: linear\ntokenizer_source: union\ntokenizer: {source: base}\nmodels: []\n",
     "tokenizer_source or tokenizer, not both"),
    ("merge_method: linear\ntokenizer: base\nmodels: []\n", "tokenizer: expected a mapping"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: a}]\n", "needs a 'model' and a 'layer_range'"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n    residual_weight: 0.5\n",
     "slices\\[0\\] field 'residual_weight' is not supported"),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]\nslices: [{sources: []}]\n", "not both"),
    ("merge_method: ties\nbase_model: b\nslices:\n  - sources:\n      - {model: b, layer_range: [0, 2]}\n"
     "      - {model: a, layer_range: [0, 2]}\n", "slices\\[0\\].sources\\[1\\] \\(a\\) has no weight"),
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


def test_mergekit_slices_and_gradients_translate_as_written(tmp_path):
    cfg = load_merge_config(write(tmp_path, """
slices:
  - sources:
      - model: ./a
        layer_range: [0, 32]
      - model: ./b
        layer_range: [0, 32]
        parameters: {t: 0.1}
merge_method: slerp
base_model: ./a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - value: 0.5
dtype: torch.bfloat16
"""))
    assert cfg.models == [] and len(cfg.slices) == 1 and cfg.dtype == "bfloat16"
    src = cfg.slices[0].sources
    assert [(str(s.model), s.layer_range, s.parameters) for s in src] == [("a", (0, 32), {}), ("b", (0, 32), {"t": 0.1})]
    assert cfg.parameters["t"][0] == {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}


def test_top_level_per_model_parameters_are_every_models_default(tmp_path):
    from mixtune.merge.run import resolve

    p = write(tmp_path, "method: ties\nbase_model: b\nparameters: {density: 0.4, weight: 2, lambda: 0.5}\n"
                        "models:\n  - {model: a}\n  - {model: c, weight: 1, parameters: {density: 0.9}}\n")
    _, params, per_model, _, _ = resolve(load_merge_config(p), tmp_path)
    assert [m.density for m in per_model] == [0.4, 0.9] and params.lambda_ == 0.5
    bad = write(tmp_path, "method: ties\nbase_model: b\nparameters: {density: [0.5, 1.5]}\nmodels: [{model: a}]\n")
    with pytest.raises(ConfigError, match=r"parameters for ties: density: Input should be less than or equal to 1"):
        resolve(load_merge_config(bad), tmp_path)  # the gradient's every value is checked before merging


def test_a_base_for_linear_is_refused_not_ignored(tmp_path):
    """mergekit merges a base_model the models do not list as one more model (mergekit/plan.py:143-157);
    for linear, whose weights mixtune must not guess, that is an error naming the field."""
    path = tmp_path / "m.yml"
    path.write_text("merge_method: linear\nbase_model: ./base\nmodels:\n  - {model: ./a, parameters: {weight: 1}}\n")
    with pytest.raises(ConfigError, match="base_model: linear takes no base model.*list it under models"):
        load_merge_config(path)
