"""The key reference (``docs/recipes.md``), generated from the config schemas so it cannot drift.

Every field's documentation is the docstring under it (``Strict``'s ``use_attribute_docstrings``),
so this module only walks the models. Regenerate with ``python -m mixtune.reference > docs/recipes.md``;
``tests/test_reference.py`` fails when the file and the schema disagree.
"""

from __future__ import annotations

import typing
from types import NoneType, UnionType

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def _models(tp, key: str) -> list[tuple[str, type[BaseModel]]]:
    """The config models inside an annotation (through Optional, lists, dicts and unions), each with
    the key path it stands at: ``stages[]``, ``sources.NAME``."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [(key, tp)]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        key += "[]"
    elif origin is dict:
        key, args = key + ".NAME", args[1:]
    return [m for arg in args for m in _models(arg, key)]


def _type(tp) -> str:
    """A short, readable type: ``int``, ``list[StageConfig]``, ``dict[str, float]``, ``cosine | linear``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is typing.Literal:
        return " or ".join(str(a) for a in args)
    if origin in (typing.Union, UnionType):
        parts = [_type(a) for a in args if a is not NoneType]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) > 1:  # a tagged union: name the choices by their tag
            return "one of: " + ", ".join(_tag(m) for m in models)
        return " or ".join(parts) + (" or null" if NoneType in args else "")
    if origin is list:
        return f"list[{_type(args[0])}]"
    if origin is dict:
        return f"dict[{_type(args[0])}, {_type(args[1])}]"
    return getattr(tp, "__name__", str(tp))


def _tag(model: type[BaseModel]) -> str:
    field = model.model_fields.get("name")
    if field is not None and typing.get_origin(field.annotation) is typing.Literal:
        return f"{model.__name__} (name: {', '.join(typing.get_args(field.annotation))})"
    return model.__name__


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{value!r}`" if value is not None else "`None`"


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def reference(roots: list[tuple[str, type[BaseModel]]]) -> str:
    """Markdown: one table per config section, in the order a reader meets them from the roots."""
    out, seen = [], set()
    queue: list[tuple[str, str, type[BaseModel]]] = []
    for root in roots:  # each root's sections, breadth first, before the next root's
        queue.append((root[0], "", root[1]))
        out += _sections(queue, seen)
    return "\n".join(out)


def _sections(queue: list[tuple[str, str, type[BaseModel]]], seen: set) -> list[str]:
    out = []
    while queue:
        title, path, model = queue.pop(0)
        if model in seen:  # described where it first stands
            continue
        seen.add(model)
        out += [f"## {title}", "", _one_line(model.__doc__), "", "| key | type | default | meaning |",
                "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            key = field.alias or name
            doc = field.description
            if doc is None and name == "name" and typing.get_origin(field.annotation) is typing.Literal:
                doc = "Which one of the choices this section is (the tag)."
            out.append(f"| `{key}` | {_type(field.annotation)} | {_default(field)} | {_one_line(doc)} |")
            queue += [(f"`{sub}`: {_tag(m)}", sub, m)
                      for sub, m in _models(field.annotation, f"{path}.{key}" if path else key) if m not in seen]
        out.append("")
    return out


def recipes_reference() -> str:
    """The text of ``docs/recipes.md``: every key of a training recipe, a study and a task file."""
    from mixtune.eval.tasks import TaskFile
    from mixtune.recipe import Recipe
    from mixtune.study import StudyConfig

    head = ("# Recipe, study and task-file keys\n\nGenerated from the schemas by `python -m mixtune.reference > docs/recipes.md` "
            "(a test keeps it in step). Unknown keys are errors that name their line; `--dry-run` prints a "
            "recipe with every default filled in.\n")
    return head + "\n" + reference([("Recipe (`mixtune train`, `mixtune data preview`)", Recipe),
                                    ("Study (`mixtune study`)", StudyConfig),
                                    ("Task file (`mixtune eval --abilities FILE.yaml`, a study's `eval.abilities`)",
                                     TaskFile)])


if __name__ == "__main__":
    print(recipes_reference(), end="")
