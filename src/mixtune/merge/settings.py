"""Parameters that vary by tensor: mergekit's gradients and name filters, resolved per tensor.

A parameter of a mergekit-named method may be given, wherever mergekit takes it (the top-level
``parameters``, a slice's, a model's or a slice source's), as

- a number, a bool or a string: the same for every tensor;
- a **gradient**, a list of numbers: interpolated piecewise-linearly over the layers, at
  t = i / (n - 1) for the i-th of a slice's n layers (t = 1 when n = 1, t = 0 for tensors outside
  the layers: embeddings, final norm, head); a list of bools or strings picks
  ``values[int(t * (len - 1))]``;
- a **filter** list, ``[{filter: self_attn, value: ...}, ..., {value: ...}]``: the first entry
  whose ``filter`` is a substring of the tensor's name (or is absent, or ``*``) gives the value,
  itself a scalar or a gradient; a single ``{filter, value}`` mapping is a list of one.

This is mergekit 0.1.5's ``evaluate_setting`` (mergekit/config.py:27-73) and its precedence
(mergekit/parameter_resolver.py:19-39, mergekit/config.py:194-206): a per-model parameter comes
from the model's own setting, then the slice's, then the top level's, then the method's default;
a setting that yields nothing for a tensor (no filter matches) passes to the next. Shared
parameters are matched against the output tensor's name, per-model ones against that model's
input tensor name (they differ only in slices).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from mixtune.core import ConfigError

Scalar = bool | int | float | str


def number(v: Any) -> float | None:
    """``v`` as a float when it is a number (not a bool) or a numeric string (YAML reads 1e-3 as one)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def is_scalar(setting: Any) -> bool:
    return isinstance(setting, Scalar)


def evaluate(setting: Any, name: str, t: float = 0.0) -> Any:
    """The value of ``setting`` for the tensor ``name`` at layer fraction ``t`` (None: no filter matched).

    Gradients interpolate as mergekit does, in float64: with s = t (len - 1), i0 = int(s),
    i1 = min(len - 1, i0 + 1), the value is (1 - (s - i0)) v[i0] + (s - i0) v[i1].
    """
    if isinstance(setting, dict):
        setting = [setting]
    if is_scalar(setting):
        return setting
    if not isinstance(setting, list) or not setting:
        return None
    if all(is_scalar(e) for e in setting):
        numbers = [number(e) for e in setting]
        if any(n is None for n in numbers):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * numbers[i0] + frac * numbers[i1]
    for cond in setting:
        where = cond.get("filter")
        if where is None or where == "*" or (name and where in name):
            return evaluate(cond["value"], name, t)
    return None


def check(setting: Any, where: str) -> list[Scalar]:
    """Every scalar ``setting`` can yield (so that each can be validated before merging); raises
    ConfigError naming ``where`` for a shape mergekit does not accept (null: the default)."""
    if setting is None or is_scalar(setting):
        return [setting]
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list) or not setting:
        raise ConfigError(f"{where} = {setting!r}: expected a value, a list of values (a gradient over the layers) "
                          "or a list of {filter: NAME, value: ...}")
    if all(is_scalar(e) for e in setting):
        return list(setting)
    out = []
    for i, cond in enumerate(setting):
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise ConfigError(f"{where}[{i}] = {cond!r}: expected {{filter: NAME, value: ...}} (filter optional); "
                              "a list mixes values and filters only as such entries")
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise ConfigError(f"{where}[{i}].filter = {cond['filter']!r}: expected a substring of tensor names")
        out += check(cond["value"], f"{where}[{i}].value")
    return out


def layer_fraction(offset: int | None, count: int) -> float:
    """mergekit's t for gradients (mergekit/plan.py:293-298): the i-th of a slice's n layers has
    i / (n - 1), a one-layer slice 1, a tensor outside the layers (``offset`` None) 0."""
    if offset is None:
        return 0.0
    return offset / (count - 1) if count > 1 else 1.0


def first(chain: Sequence[dict], key: str, name: str, t: float) -> Any:
    """The first value the settings in ``chain`` (highest precedence first) give ``key`` for ``name``."""
    for settings in chain:
        if settings and key in settings:
            value = evaluate(settings[key], name, t)
            if value is not None:
                return value
    return None


def resolved(keys: Sequence[str], chain: Sequence[dict], name: str, t: float) -> dict:
    """{key: value} for the keys ``chain`` gives a value for at this tensor (others keep their defaults)."""
    out = {}
    for key in keys:
        value = first(chain, key, name, t)
        if value is not None:
            out[key] = value
    return out


class Cache:
    """``build(values)`` memoised on the resolved values: a gradient gives a handful of distinct
    points, so pydantic validates each once, not once per tensor."""

    def __init__(self, build: Callable[[dict], Any]) -> None:
        self.build, self.seen = build, {}

    def __call__(self, values: dict) -> Any:
        key = tuple(sorted((k, repr(v)) for k, v in values.items()))
        if key not in self.seen:
            self.seen[key] = self.build(values)
        return self.seen[key]


# -- a method's parameters from the config, checked and resolved per tensor -------------------------

def explain(e: Exception) -> str:
    """One line per pydantic problem: the field, what is wrong, the value given."""
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']} (got {err.get('input')!r})"
                         for err in e.errors())
    return str(e)


def split(method, settings: dict) -> tuple[dict, dict]:
    """``settings`` as the method's own parameters and defaults of its per-model ones (and weight)."""
    per_model = set(method.model_params.model_fields) | {"weight"}
    own = {f.alias or k for k, f in method.params.model_fields.items()} | set(method.params.model_fields)
    shared = {k: v for k, v in settings.items() if k in own or k not in per_model}
    return shared, {k: v for k, v in settings.items() if k not in shared}


def leaves(settings: dict, where: str) -> list[dict]:
    """Scalar versions of ``settings`` that together try every value a gradient or filter can give
    (the first of each, then each key's others in turn): validating them catches a bad value before
    any tensor is read."""
    options = {k: check(v, f"{where}.{k}") for k, v in settings.items()}
    first = {k: v[0] for k, v in options.items()}
    return [first] + [first | {k: v} for k, vs in options.items() for v in vs[1:]]


def validated(model, values: dict, what: str):
    try:
        return model.model_validate(values)
    except Exception as e:
        raise ConfigError(f"{what}: {explain(e)}") from None


def weight_value(value, what: str) -> float:
    found = number(value)  # a numeric string too, as mergekit's float takes it; not a bool
    if found is None:
        raise ConfigError(f"{what}: weight {value!r}: expected a number")
    return found


def check_model_values(method, values: dict, what: str) -> None:
    values = dict(values)
    if "weight" in values:
        weight_value(values.pop("weight"), what)
    validated(method.model_params, values, what)


def tensor_parameters(method, cfg, params) -> Callable:
    """``at(out_tensor) -> (params, per-model params, weights)`` for each tensor of the plan.

    mergekit's methods resolve every setting at the tensor (gradients at its layer fraction, filters
    on its name; :mod:`mixtune.merge.settings`), each resolved set validated once. Paper methods take
    ``params`` (one value each) and, per model, its weight (its own, the slice's, the top level's, or 1).
    """
    shared_names = [f.alias or k for k, f in method.params.model_fields.items()]
    model_names = [*method.model_params.model_fields, "weight"]
    shared_top, model_top = split(method, cfg.parameters)
    splits = {None: ({}, {})} | {s: split(method, sl.parameters) for s, sl in enumerate(cfg.slices)}
    build_params = Cache(lambda v: validated(method.params, v, f"parameters for {cfg.method}"))
    build_model = Cache(lambda v: validated(method.model_params, v, f"per-model parameters for {cfg.method}"))

    def at(tp):  # a plan.OutTensor
        slice_shared, slice_model = splits[tp.slice]
        p = build_params(resolved(shared_names, [slice_shared, shared_top], tp.key, tp.t)) if method.mergekit else params
        per, weights = [], []
        for inp in tp.inputs:
            if inp.is_base:
                continue
            chain = [inp.own, slice_model, model_top]
            values = resolved(model_names, chain, inp.key, tp.t)
            weight = values.pop("weight", 1.0)
            weights.append(weight_value(weight, f"tensor {tp.key}"))
            per.append(build_model(values))
        return p, per, weights

    return at
