"""Several merges in one YAML file (mergekit-multi): documents separated by ``---``, each a merge
config in either form with an optional ``name:``, where a document may take another's output
wherever a model path goes.

As mergekit 0.1.5's ``mergekit-multi`` does (``mergekit/scripts/multimerge.py``):

- a document may carry ``name``; at most one has none, and that one is the final merge, written to
  the output folder (:110-113 require ``--out-path`` for it); a repeated name and a second unnamed
  document are errors (:236-242);
- a named document's output is the folder NAME in the intermediate folder (:190-194), and a model
  path in any document that equals a name is that folder (:124-168);
- the documents run in an order where every merge comes after the merges it reads, found by a
  depth-first walk that stops at a cycle (:183-205);
- an intermediate folder that exists is not merged again (:39-49, ``--lazy``, the default) unless
  asked (here ``overwrite``).

Where mixtune differs: a reference is looked for only where a path goes (``base_model``,
``models[].model``, ``slices[].base_model``, ``slices[].sources[].model``, ``files_from``,
``tokenizer_source``, ``tokenizer.source`` and a token's ``source`` or ``source.model``; mergekit tries
every string of the config); a path that
is neither an existing file or folder nor a name, a name that is also a path from the config's
folder, and a name that is not a plain folder name are errors naming the document and the field;
intermediates go to ``OUT.parts/NAME`` unless an intermediate folder is given, and when every
document is named each is written to ``OUT/NAME``; an existing output is kept only when its
``merge.yaml`` is this document's resolved config and nothing it reads is merged again in the same
run (mergekit keeps any folder holding a config and weights, even after its document changed); a
stale intermediate is merged again, a stale final output needs ``overwrite`` as a single merge does.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mixtune.core import CheckpointError, ConfigError
from mixtune.core.config import apply_override, line_of, read_text, validate
from mixtune.merge.adapter import is_adapter
from mixtune.merge.config import MergeConfig, from_mergekit
from mixtune.merge.plan import normpath
from mixtune.merge.run import check_inputs, check_merge, here, merge, open_inputs, resolve, vocab_rule

LENIENT = ("tokenizer_source", "tokenizer")
"""Fields whose values need not be paths (``base``, ``union``, a token's ``zero``): only a name is replaced
there, and anything else is left to the tokenizer's own checks."""


@dataclass(frozen=True)
class Step:
    """One document of a multi-merge file, resolved."""

    index: int
    """Its place in the file, from 0."""
    name: str | None
    """Its ``name:``; None for the final merge."""
    cfg: MergeConfig
    """Its config, with every reference to another document replaced by that document's output folder."""
    out: Path
    """The folder it is written to."""
    reads: tuple[str, ...]
    """The names of the merges whose outputs it takes, as they appear in it."""
    base_dir: Path
    """The config file's folder, which the config's other paths are taken from."""

    @property
    def label(self) -> str:
        """``document 2 (second-merge)``: how messages name it."""
        return _label(self.index, self.name)


def documents(path: str | os.PathLike) -> list[tuple[yaml.Node | None, Any]]:
    """Every YAML document of the file at ``path``, as its node (for line numbers) and its data."""
    path = Path(path)
    text = read_text(path)
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        data = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML: "
                          f"{getattr(e, 'problem', e)}") from None
    return list(zip(nodes, data))


def is_multi(path: str | os.PathLike) -> bool:
    """Whether the YAML file at ``path`` holds more than one document (``---`` between them)."""
    return len(documents(path)) > 1


def _label(i: int, name: str | None) -> str:
    return f"document {i + 1} ({name or 'unnamed: the final merge'})"


def _dotted(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _path_fields(doc: dict) -> Iterator[tuple]:
    """Where a model path goes in a document of either form: each field's location."""
    for key in ("base_model", "files_from", "tokenizer_source"):
        if key in doc:
            yield (key,)
    tokenizer = doc.get("tokenizer")
    if isinstance(tokenizer, dict):
        if "source" in tokenizer:
            yield ("tokenizer", "source")
        tokens = tokenizer.get("tokens")
        for token, rule in (tokens.items() if isinstance(tokens, dict) else ()):
            source = rule.get("source") if isinstance(rule, dict) else None
            if isinstance(source, dict) and "model" in source:
                yield ("tokenizer", "tokens", token, "source", "model")
            elif source is not None:
                yield ("tokenizer", "tokens", token, "source")
    models = doc.get("models")
    for i, m in enumerate(models if isinstance(models, list) else []):
        if isinstance(m, dict) and "model" in m:
            yield ("models", i, "model")
    slices = doc.get("slices")
    for s, sl in enumerate(slices if isinstance(slices, list) else []):
        if not isinstance(sl, dict):
            continue
        if "base_model" in sl:
            yield ("slices", s, "base_model")
        sources = sl.get("sources")
        for j, src in enumerate(sources if isinstance(sources, list) else []):
            if isinstance(src, dict) and "model" in src:
                yield ("slices", s, "sources", j, "model")


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: name {name!r}: expected a non-empty string (the intermediate folder's name)")
    if name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"{where}: name {name!r}: expected a plain folder name, without a path separator")
    return name


def _outputs(path: Path, names: dict[str, int], final: int | None, out, intermediate_dir) -> tuple[dict, Path | None]:
    """Each named document's output folder and the final merge's."""
    if final is not None:
        if out is None:
            raise ConfigError(f"{path}: {_label(final, None)} is the final merge: give the output folder (--out DIR)")
        parts = Path(intermediate_dir) if intermediate_dir is not None else Path(f"{Path(out)}.parts")
        return {n: parts / n for n in names}, Path(out)
    if out is not None and intermediate_dir is not None and Path(out).resolve() != Path(intermediate_dir).resolve():
        raise ConfigError(f"{path}: every document is named, so each is written to DIR/NAME: give --out DIR or "
                          "--intermediate-dir DIR, not both")
    folder = out if out is not None else intermediate_dir
    if folder is None:
        raise ConfigError(f"{path}: give the output folder (--out DIR): each named merge is written to DIR/NAME")
    return {n: Path(folder) / n for n in names}, None


def load_multi_config(path: str | os.PathLike, out: str | os.PathLike | None = None, *,
                      intermediate_dir: str | os.PathLike | None = None,
                      overrides: dict | None = None) -> list[Step]:
    """The documents of a multi-merge file as :class:`Step`s, in an order where each comes after
    the merges it reads (otherwise in the file's order).

    Args:
        path: the YAML file; its documents' paths are taken from its folder.
        out: the final (unnamed) merge's folder; when every document is named, the folder their
            outputs go in (as ``out/NAME``).
        intermediate_dir: where the named documents' outputs go (default: ``out`` + ``.parts``).
        overrides: dotted ``key: value`` pairs applied to every document's mixtune fields.

    Raises:
        ConfigError: one line naming the document (its number and name) and the field: a repeated
            name, a second unnamed document, a name that is also a path, a reference to neither a
            path nor a name, merges that read each other in a cycle; or the document's own config error.
    """
    path = Path(path)
    base_dir = path.parent
    docs = [(i, node, data) for i, (node, data) in enumerate(documents(path)) if data is not None]
    if not docs:
        raise ConfigError(f"{path}: holds no merge document")
    names: dict[str, int] = {}
    final = None
    for i, node, data in docs:
        where = f"{path}:{node.start_mark.line + 1}: document {i + 1}"
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a merge config (a mapping of keys), found {type(data).__name__}")
        if "name" not in data:
            if final is not None:
                raise ConfigError(f"{where}: has no name, nor has document {final + 1}: only one document (the "
                                  "final merge) may be unnamed")
            final = i
            continue
        name = _check_name(data["name"], f"{path}:{line_of(node, ('name',))}: document {i + 1}")
        if name in names:
            raise ConfigError(f"{path}:{line_of(node, ('name',))}: document {i + 1}: name {name!r} is document "
                              f"{names[name] + 1}'s too; give each merge its own name")
        names[name] = i
    outs, final_out = _outputs(path, names, final, out, intermediate_dir)
    for name, i in names.items():
        shadowed = base_dir / name
        if shadowed.exists() and shadowed.resolve() != outs[name].resolve():
            node = next(n for j, n, _ in docs if j == i)
            raise ConfigError(f"{path}:{line_of(node, ('name',))}: {_label(i, name)}: name {name!r} is also "
                              f"{shadowed}, a path from the config's folder, so a reference to it would be ambiguous; "
                              "rename the merge")

    steps: dict[int, Step] = {}
    uses: dict[int, list[tuple[str, str, int]]] = {}  # document -> (name read, field, line)
    for i, node, data in docs:
        name = data.get("name")
        label = _label(i, name)
        doc = copy.deepcopy({k: v for k, v in data.items() if k != "name"})
        uses[i] = []
        for loc in _path_fields(doc):
            *parents, last = loc
            holder = doc
            for p in parents:
                holder = holder[p]
            value = holder[last]
            if not isinstance(value, str):
                continue  # left to the config's own checks
            line = line_of(node, loc)
            if value in outs:
                holder[last] = str(outs[value].absolute())
                uses[i].append((value, _dotted(loc), line))
            elif loc[0] not in LENIENT and not here(Path(value), base_dir).exists():
                close = difflib.get_close_matches(value, list(names), n=1)
                known = f"names: {', '.join(names)}" if names else "it names none"
                raise ConfigError(f"{path}:{line}: {label}: {_dotted(loc)} {value!r} is neither a path from the "
                                  f"config's folder nor the name of a merge in this file ({known})"
                                  f"{f'; did you mean {close[0]!r}?' if close else ''}")
        steps[i] = Step(i, name, _validated(doc, node, path, label, overrides or {}),
                        final_out if name is None else outs[name], tuple(n for n, _, _ in uses[i]), base_dir)
    return [steps[i] for i in _order(path, [i for i, _, _ in docs], names, uses, steps)]


def _validated(doc: dict, node: yaml.Node, path: Path, label: str, overrides: dict) -> MergeConfig:
    """One document's config, read in its form (mergekit's by its ``merge_method``, else mixtune's)."""
    where = f"{path}:{node.start_mark.line + 1}: {label}"
    if "merge_method" in doc:
        data = from_mergekit(doc, where)
        for key, value in overrides.items():
            apply_override(data, key, value)
        return validate(MergeConfig, data, where=f"{where} (read as a mergekit config)")
    for key, value in overrides.items():
        apply_override(doc, key, value)
    try:
        return validate(MergeConfig, doc, where=str(path), root=node, overrides=overrides)
    except ConfigError as e:  # its lines are the file's; say which document they are in
        raise ConfigError(f"{path}: {label}: {str(e).removeprefix(f'{path}: ')}") from None


def _order(path: Path, indices: list[int], names: dict[str, int], uses: dict, steps: dict) -> list[int]:
    """The documents in the file's order, each moved after the merges it reads (depth first)."""
    order: list[int] = []
    state: dict[int, str] = {}

    def visit(i: int, trail: list[int]) -> None:
        if state.get(i) == "done":
            return
        if state.get(i) == "open":
            cycle = trail[trail.index(i):] + [i]
            links = []
            for a, b in zip(cycle, cycle[1:]):
                name_b = steps[b].name
                field, line = next((f, ln) for n, f, ln in uses[a] if n == name_b)
                links.append(f"{steps[a].label} reads {name_b!r} at {field} (line {line})")
            raise ConfigError(f"{path}: the merges read each other in a cycle: {', '.join(links)}; a merge "
                              "cannot take its own output")
        state[i] = "open"
        for name, _field, _line in uses[i]:
            visit(names[name], trail + [i])
        state[i] = "done"
        order.append(i)

    for i in indices:
        visit(i, [])
    return order


def _recorded(folder: Path) -> dict | None:
    """The config a merged folder was written from (its ``merge.yaml``), or None where it has none."""
    try:
        return yaml.safe_load((folder / "merge.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def plan_runs(steps: list[Step], overwrite: bool = False) -> list[tuple[Step, str, str]]:
    """What a run does with each step: ``("merge" | "keep" | "remerge", why)``.

    An existing output is kept when its ``merge.yaml`` is the step's resolved config and no merge it
    reads is merged in this run; otherwise an intermediate is merged again, and a final output stops
    the run (as a single merge does) unless ``overwrite``, which merges every step again.

    Raises:
        CheckpointError: an existing output that mixtune did not write, or a stale final output
            without ``overwrite``; before anything is merged.
    """
    runs, merged = [], set()
    for st in steps:
        action, why = "merge", ""
        if st.out.exists() and not overwrite:
            recorded = _recorded(st.out)
            if recorded is None:
                raise CheckpointError(f"{st.out} ({st.label}'s output) exists but holds no merge.yaml, so mixtune "
                                      "did not write it; remove it, or overwrite it (--overwrite)")
            changed = recorded != st.cfg.model_dump(mode="json")
            again = [n for n in st.reads if n in merged]
            if not changed and not again:
                action = "keep"
            else:
                why = "its document changed" if changed else f"{again[0]!r} is merged again"
                if st.name is None:
                    raise CheckpointError(f"{st.out} already exists ({st.label}: {why}); choose another folder, or "
                                          "overwrite it (--overwrite)")
                action = "remerge"
        if action != "keep":
            merged.add(st.name)
        runs.append((st, action, why))
    return runs


def check_multi(steps: list[Step], overwrite: bool = False) -> list[tuple[Step, str, str, int | None, list[str]]]:
    """What :func:`merge` checks, for every step, before anything is written.

    A step whose inputs all exist (or are kept) is checked whole (:func:`~mixtune.merge.run.check_merge`);
    one that reads a merge still to be made is checked as far as can be: its config, and the headers of
    its existing inputs (their shapes against each other, for ``models``).

    Returns:
        For each step in run order: it, its action and why (:func:`plan_runs`), its number of output
        tensors (None while inputs are pending) and the names of the merges it waits for.
    """
    runs = plan_runs(steps, overwrite)
    made = {st.name for st, action, _ in runs if action != "keep"}
    folders = {st.out.resolve() for st, action, _ in runs if action != "keep"}
    checked = []
    for st, action, why in runs:
        pending = list(dict.fromkeys(n for n in st.reads if n in made))
        if not pending:
            checked.append((st, action, why, check_merge(st.cfg, st.base_dir), []))
            continue
        _method, _params, _per, base, models = resolve(st.cfg, st.base_dir)
        ready = lambda p: Path(p).resolve() not in folders  # noqa: E731
        base = base if base is not None and ready(base) else None
        present = [p for p in dict.fromkeys(normpath(p) for p in models)
                   if ready(p) and (base is not None or not is_adapter(p))]
        readers = open_inputs(base, present)
        try:
            if st.cfg.models and len(readers) > 1:
                check_inputs(readers[0], readers[1:], vocab_rule(st.cfg))
        finally:
            for r in readers:
                r.close()
        checked.append((st, action, why, None, pending))
    return checked


def run_multi(steps: list[Step], *, overwrite: bool = False, say: Callable[[str], None] | None = None,
              on_start: Callable[[Step, str], None] | None = None,
              progress: Callable[[str], None] | None = None, on_pass: Callable[[str], None] | None = None,
              notice: Callable[[str], None] | None = None) -> list[Path]:
    """Merge every step in order with :func:`~mixtune.merge.run.merge` (each written whole or not at
    all), keeping outputs that are up to date (:func:`plan_runs`); returns the output folders.

    Args:
        say: given a line for each output kept.
        on_start: given each step about to be merged and why it is merged again ("" the first time).
        progress, on_pass, notice: passed to :func:`~mixtune.merge.run.merge` for every step.
    """
    for st, action, why in plan_runs(steps, overwrite):
        if action == "keep":
            if say is not None:
                say(f"{st.label}: {st.out} is up to date, kept")
            continue
        if on_start is not None:
            on_start(st, why)
        merge(st.cfg, st.out, base_dir=st.base_dir, overwrite=overwrite or action == "remerge",
              progress=progress, on_pass=on_pass, notice=notice)
    return [st.out for st in steps]
