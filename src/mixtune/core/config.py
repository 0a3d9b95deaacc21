"""Strict typed configs: YAML + ``key=value`` overrides -> frozen pydantic models.

Every problem in a recipe is reported at once, each with the file and line it
comes from, the value given and what was expected (torchtune collects config
errors the same way; nanoGPT's rule that unknown keys fail is kept).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mixtune.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base of every config: unknown keys fail, instances are frozen, and the
    docstring under each field is its documentation (``--help`` and ``--dry-run``
    reuse it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into ``{"a.b": 1, "c": "x"}``; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. seed=1 or mixture.total=500")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e.problem})") from None
    return out


def apply_override(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.0.c = value`` in nested dicts and lists (an integer part indexes a list)."""
    node: Any = data
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {dotted}: {'.'.join(parts[:depth]) or 'top level'} is a list of "
                                  f"{len(node)}; expected an index 0..{len(node) - 1}, got {part!r}")
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
            if not last and node.get(key) is None:
                node[key] = {}
        else:
            raise ConfigError(f"override {dotted}: {'.'.join(parts[:depth])} holds {node!r}, not a mapping or list")
        if last:
            node[key] = value
        else:
            node = node[key]


def _child(node: yaml.Node | None, key) -> yaml.Node | None:
    """The YAML node under ``key`` of a mapping node (or index of a sequence node), if there is one."""
    if isinstance(node, yaml.MappingNode):
        return next((v for k, v in node.value if k.value == str(key)), None)
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
        return node.value[key]
    return None


def line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the YAML node at ``loc`` (or of its nearest existing parent)."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for key in loc:
        match = _child(node, key)
        if match is None:
            # Pydantic adds union/tag names to locations; skip them and keep the parent line.
            continue
        node, line = match, match.start_mark.line + 1
    return line


def _as_written(root: yaml.Node | None, loc: tuple) -> tuple:
    """``loc`` without the union tags pydantic inserts (``tasks.qa.generate.path`` -> ``tasks.qa.path``):
    a part that is not a key of the file is dropped unless it is the last (an unknown or missing key)."""
    if root is None:
        return loc
    node, kept = root, []
    for i, key in enumerate(loc):
        match = _child(node, key)
        if match is None and i < len(loc) - 1:
            continue
        kept.append(key)
        node = match
    return tuple(kept)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys accepted by the config section at ``loc`` (best effort through unions, lists and dicts)."""
    import typing

    def models_in(tp: Any) -> list[type[BaseModel]]:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return [tp]
        return [m for arg in typing.get_args(tp) for m in models_in(arg)]

    def tags(m: type[BaseModel]) -> set:
        """The values of a model's Literal fields: how a tagged union names it (``kind: generate``)."""
        return {a for f in m.model_fields.values() if typing.get_origin(f.annotation) is typing.Literal
                for a in typing.get_args(f.annotation)}

    current = [model]
    for part in loc:
        nxt: list[type[BaseModel]] = []
        for m in current:
            if isinstance(part, str) and part in m.model_fields:
                nxt += models_in(m.model_fields[part].annotation)
        # a union tag picks its member; a list index or a dict key leaves the section where it is
        current = nxt or [m for m in current if part in tags(m)] or current
    return sorted({f for m in current for f in m.model_fields})


def _unknown_key_hint(model: type[BaseModel], loc: tuple) -> str:
    """``unknown key; did you mean 'steps'? (keys here: ...)``: close matches and the section's keys."""
    import difflib

    known = _fields_at(model, loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    keys = f" (keys here: {', '.join(known)})" if known else ""
    docs = getattr(model, "DOCS", None)  # a ClassVar of the root config: where its keys are described
    return f"unknown key{hint}{keys}" + (f"; every key is described in {docs}" if docs else "")


def _format_errors(err: ValidationError, where: str, root: yaml.Node | None, overrides: dict,
                   model: type[BaseModel] | None = None) -> str:
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        place = _place(where, root, overrides, loc)
        shown = loc if place == "override" else _as_written(root, loc)
        dotted = ".".join(str(p) for p in shown) or "(top level)"
        given = "" if e["type"] == "missing" else f" = {_short(e['input'])}"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = _unknown_key_hint(model, loc) if model is not None else "unknown key"
        lines.append(f"  {place} {dotted}{given}: {msg}")
    n = len(lines)
    return f"{where}: {n} problem{'s' if n > 1 else ''} in the config:\n" + "\n".join(lines)


def _place(where: str, root: yaml.Node | None, overrides: dict, loc: tuple) -> str:
    """``run.yaml:12`` for a key from the file, ``override`` for one set (or created) by an override."""
    dotted = ".".join(str(p) for p in loc)
    if any(dotted == k or dotted.startswith(k + ".") or k.startswith(dotted + ".") for k in overrides):
        return "override"
    line = line_of(root, loc)
    return f"{where}:{line}" if line else where


def existing_path(v: Path | None, info) -> Path | None:
    """A path field checked against the folder its config file lies in: ``info.context["base_dir"]``
    (given when the file is read, absent for configs built in code). Returns the full path.

    Raises:
        ValueError: it does not exist (pydantic reports it at its line, with the other problems).
    """
    base = (info.context or {}).get("base_dir")
    if v is None or base is None:
        return v
    full = v if v.is_absolute() else Path(base) / v
    if not full.exists():
        raise ValueError(f"no such file or folder: {str(full)!r}")
    return full


def validate(model: type[M], data: Any, *, where: str = "config", root: yaml.Node | None = None,
             overrides: dict | None = None, context: dict | None = None) -> M:
    """Validate ``data`` against ``model``; every problem is listed in one :class:`ConfigError`.

    ``context`` reaches validators that check what the schema alone cannot know, e.g. ``base_dir``
    for the data files a recipe names (their problems are listed with the others).
    """
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, where, root, overrides or {}, model)) from None


def read_text(path: Path) -> str:
    """A config file's text; a missing file, a folder or text that is not UTF-8 is a ConfigError
    naming the file (and the line of the first bad byte)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; expected a YAML file") from None
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the file as UTF-8") from None


def load_config(model: type[M], path: str | os.PathLike, overrides: dict[str, Any] | None = None, *,
                context: dict | None = None) -> M:
    """Read a YAML file, apply dotted ``overrides`` and validate it into ``model``.

    Raises:
        ConfigError: the file is missing or not YAML, or the content does not fit
            ``model`` (every problem listed with its line).
    """
    path = Path(path)
    text = read_text(path)
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the top level must be a mapping of keys, found {type(data).__name__}")
    overrides = overrides or {}
    for key, value in overrides.items():
        apply_override(data, key, value)
    return validate(model, data, where=str(path), root=root, overrides=overrides, context=context)


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML, headed by mixtune's version (saved beside every artefact)."""
    from mixtune import __version__

    body = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    return f"# resolved by mixtune {__version__}\n{body}"
