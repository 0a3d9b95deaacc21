"""Read data sources into chat records: JSONL, Parquet, a saved ``datasets`` folder, or the built-in suite.

Every record comes out as ``{"messages": [{"role", "content"}, ...], "ability": str, ...}``;
other keys (``answer``, ``id`` ...) are kept as they are. A record may arrive in any of
three shapes, recognised by its keys:

============================  =================================================
keys                          becomes
============================  =================================================
``messages``                  itself (roles ``system``/``user``/``assistant``)
``prompt`` + ``completion``   one user turn, one assistant turn
``instruction`` + ``output``  user turn = instruction (+ blank line + ``input``
(+ optional ``input``)        when present), assistant turn = output
============================  =================================================

``ability`` defaults to the source's ``ability`` setting, else the source name.
A record that fits none of these is an error naming the file and line or row.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from mixtune.core import DataError, Strict
from mixtune.data.abilities import ABILITIES
from mixtune.data.select import SelectConfig

ROLES = ("system", "user", "assistant")


class SourceConfig(Strict):
    """One named data source: a built-in ability or a file/folder of records."""

    builtin: str | None = None
    """Name of a built-in ability (``math``, ``code``, ``general``); exclusive with ``path``."""
    path: Path | None = None
    """A ``.jsonl`` or ``.parquet`` file, or a folder written by ``datasets``' ``save_to_disk``.
    Relative paths are taken from the recipe's folder."""
    n: int | None = Field(default=None, ge=1)
    """Built-in only: how many distinct problems to generate (default 1000)."""
    split: str = "train"
    """Built-in: ``train`` or ``test``. Saved ``DatasetDict`` folders: which split to read."""
    difficulty: int = Field(default=1, ge=1, le=3)
    """Built-in only: difficulty level 1-3 (``mixtune list`` describes each)."""
    seed: int | None = None
    """Built-in only: generator seed (default: the recipe's seed)."""
    ability: str | None = None
    """Ability tag for records that carry none (default: the source name)."""
    condition: str | None = None
    """C-RLFT class tag of this source (e.g. ``GPT4`` for expert data): it opens every turn of its
    records in training; evaluate with the same tag (``eval.condition``) to ask for that class."""
    select: SelectConfig | None = None
    """Keep part of the source by the starting model's likelihood of each response: ``{method:
    grape}`` (best candidate per prompt) or ``{method: perplexity, keep: 0.5}``."""

    @model_validator(mode="after")
    def _one_kind(self) -> SourceConfig:
        if (self.builtin is None) == (self.path is None):
            raise ValueError("give exactly one of `builtin` (an ability name) or `path` (a file or folder)")
        if self.path is not None and self.n is not None:
            raise ValueError("`n` applies to built-in sources; take part of a file with the mixture's count or fraction")
        if self.builtin is not None and self.split not in ("train", "test"):
            raise ValueError(f"built-in split must be 'train' or 'test', got {self.split!r}")
        return self


def load_source(name: str, cfg: SourceConfig, *, seed: int = 0, base_dir: str | os.PathLike = ".") -> list[dict]:
    """All records of one source, normalised (see the module docstring).

    Raises:
        DataError: the file is missing, unreadable, empty, or a record does not fit.
    """
    records = _load(name, cfg, seed=seed, base_dir=base_dir)
    return [r | {"condition": cfg.condition} for r in records] if cfg.condition else records


def _load(name: str, cfg: SourceConfig, *, seed: int, base_dir) -> list[dict]:
    ability = cfg.ability or name
    if cfg.builtin is not None:
        gen = ABILITIES.get(cfg.builtin)
        records = gen.generate(cfg.n or 1000, seed=cfg.seed if cfg.seed is not None else seed,
                               split=cfg.split, difficulty=cfg.difficulty)  # type: ignore[arg-type]
        if cfg.ability:
            records = [r | {"ability": cfg.ability} for r in records]
        return records
    path = Path(cfg.path)  # type: ignore[arg-type]
    if not path.is_absolute():
        path = Path(base_dir) / path
    if not path.exists():
        raise DataError(f"source {name!r}: {path}: no such file or folder")
    if path.is_dir():
        rows = _read_saved_dataset(path, cfg.split)
    elif path.suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif path.suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise DataError(
            f"source {name!r}: {path}: unsupported file type {path.suffix!r}; expected .jsonl, "
            f".parquet or a folder saved with datasets' save_to_disk"
        )
    records = [normalise_record(obj, where, default_ability=ability) for where, obj in rows]
    if not records:
        raise DataError(f"source {name!r}: {path}: contains no records")
    return records


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    return rows


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: cannot read as Parquet ({e})") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist())]


def _read_saved_dataset(path: Path, split: str) -> list[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: has no split {split!r}; splits: {', '.join(ds)} (set the source's `split`)")
        ds = ds[split]
    return [(f"{path} row {i}", row) for i, row in enumerate(ds)]


def normalise_record(obj: Any, where: str, *, default_ability: str) -> dict:
    """One raw record in any accepted shape -> a chat record. ``where`` names it in errors."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with a conversation, found {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        rest = {k: v for k, v in obj.items() if k != "messages"}
    elif "prompt" in obj and "completion" in obj:
        messages = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
        rest = {k: v for k, v in obj.items() if k not in ("prompt", "completion")}
    elif "instruction" in obj and "output" in obj:
        extra = obj.get("input")
        user = obj["instruction"] if not extra else f"{obj['instruction']}\n\n{extra}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
        rest = {k: v for k, v in obj.items() if k not in ("instruction", "input", "output")}
    else:
        raise DataError(
            f"{where}: no conversation found; keys present: {', '.join(map(str, obj)) or '(none)'}. Expected "
            f'"messages" (a list of {{"role", "content"}}), or "prompt" + "completion", or "instruction" + "output"'
        )
    _check_messages(messages, where)
    ability = rest.get("ability", default_ability)
    if not isinstance(ability, str) or not ability:
        raise DataError(f"{where}: \"ability\" must be a non-empty string, found {ability!r}")
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return rest | {"messages": clean, "ability": ability}


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list, found {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] must be an object with \"role\" and \"content\", found {m!r:.80}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}].role = {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(
                f"{where}: messages[{i}].content must be a string, found {type(m['content']).__name__}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn; a training record needs at least one (roles: "
                        f"{', '.join(m['role'] for m in messages)})")


__all__ = ["ROLES", "SourceConfig", "load_source", "normalise_record"]
