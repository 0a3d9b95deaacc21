"""Read data sources into chat records: JSONL, a JSON array, Parquet, a saved ``datasets`` folder, or the built-in suite.

Every record comes out as ``{"messages": [{"role", "content"}, ...], "ability": str, ...}``;
other keys (``answer``, ``id`` ...) are kept as they are. A record may arrive in any of the
shapes people download, recognised by its keys:

================================  =================================================
keys                              becomes
================================  =================================================
``messages``                      itself (roles ``system``/``user``/``assistant``); a
                                  turn's ``content`` may be a string or OpenAI's list
                                  of parts (``[{"type": "text", "text": ...}]``: the
                                  text parts joined, as chat templates render them)
``conversations`` (ShareGPT)      one turn per ``{"from", "value"}`` (or ``{"role",
                                  "content"}``): ``human``/``user`` -> user, ``gpt``/
                                  ``chatgpt``/``assistant``/``model`` -> assistant,
                                  ``system`` -> system
``prompt`` + ``chosen`` +         a preference pair (TRL's convention): the prompt (a
``rejected``                      string, one user turn, or a list of turns) and the chosen
                                  reply (a string, or a list holding one assistant turn) make
                                  the conversation; the rejected reply is kept as ``rejected``
                                  (a string), for ``dpo`` stages (SFT trains on the chosen)
``prompt`` + ``completion``       one user turn, one assistant turn
``instruction`` + ``output``      user turn = instruction (+ blank line + ``input``
(+ optional ``input``; Alpaca)    when present), assistant turn = output

``text`` (raw text, no turns)     itself, ``{"text": ..., "ability": ...}``: continued
                                  pretraining, trained on every token (documents longer
                                  than ``format.seq_len`` are cut into rows)
================================  =================================================

A string ``system`` field (ShareGPT's and many Alpaca variants' system prompt) becomes the first
turn; so does the source's ``system`` setting, for records that have no system turn. Multi-turn
conversations keep every turn, and every assistant turn is trained.

Files: ``.jsonl`` (one record per line), ``.json`` (an array of records, as the Alpaca dataset
ships; a ``.json`` file holding JSON Lines is read as such), ``.parquet``, or a ``save_to_disk``
folder. ``ability`` defaults to the source's ``ability`` setting, else the source name. A record
that fits none of these is an error naming the file and line or row.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_serializer, model_validator

from mixtune.core import DataError, Strict, UnknownNameError, existing_path
from mixtune.data.abilities import ABILITIES
from mixtune.data.select import SelectConfig

ROLES = ("system", "user", "assistant")
MAX_RECORD_BYTES = 4 * 2**20
"""Default ``max_record_bytes``: 4 MiB. Tokenizing one record that long takes about 14 s and 2 GB
with the built-in tokenizer, so the limit bounds what one bad record can cost."""
STREAM_HINT_BYTES = 2**30
"""A JSONL source larger than this (1 GiB), loaded whole, gets a warning pointing to ``stream``."""

log = logging.getLogger(__name__)


class SourceConfig(Strict):
    """One named data source: a built-in ability or a file/folder of records."""

    builtin: str | None = None
    """Name of a built-in ability (``math``, ``code``, ``general``); exclusive with ``path``."""
    path: Path | None = None
    """A ``.jsonl``, ``.json`` (an array of records) or ``.parquet`` file, or a folder written by
    ``datasets``' ``save_to_disk``.
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
    system: str | None = None
    """A system prompt for records that have no system turn (put first; trained on never)."""
    condition: str | None = None
    """C-RLFT class tag of this source (e.g. ``GPT4`` for expert data): it opens every turn of its
    records in training; evaluate with the same tag (``eval.condition``) to ask for that class."""
    select: SelectConfig | None = None
    """Keep part of the source by the starting model's likelihood of each response: ``{method:
    grape}`` (best candidate per prompt) or ``{method: perplexity, keep: 0.5}``."""
    empty_turns: Literal["error", "drop"] = "error"
    """A record with an empty (or whitespace-only) assistant turn: stop with an error naming its
    line or row, or drop the record (the count is reported)."""
    max_record_bytes: int = Field(default=MAX_RECORD_BYTES, ge=1)
    """Longest record accepted, in UTF-8 bytes (a JSONL line, or a row's turn texts together);
    a longer one is an error when read, before it is held whole or tokenized. Default 4 MiB,
    about a million tokens, past any model's context."""
    stream: bool = False
    """``.jsonl`` only: for data larger than memory. The file is indexed by the byte offsets of its
    lines in one pass (every record checked, as when loading), then tokenized in chunks into a
    memory-mapped cache, and stages that use it are packed into memory-mapped rows; records are read
    on demand. The rows are bitwise those of the in-memory path. The caches live under
    ``$XDG_CACHE_HOME/mixtune/data`` (default ``~/.cache``), keyed by the file's path, size and
    modification time, the tokenizer and the settings that shape records, so a rerun or resumed run
    reuses them; delete the folder to reclaim the space (packed rows take 40 bytes per token)."""

    @model_serializer(mode="wrap")
    def _stream_only_when_on(self, handler):
        # `stream` changes where data lives, never the rows: left out of dumps at its default, so the
        # saved config and every key that hashes a source (a study's stage keys) stay as they were.
        out = handler(self)
        if not self.stream and isinstance(out, dict):
            out.pop("stream", None)
        return out

    @field_validator("builtin")
    @classmethod
    def _known_ability(cls, v: str | None) -> str | None:
        if v is not None and v not in ABILITIES:
            try:
                ABILITIES.get(v)
            except UnknownNameError as e:  # reported at its line, with the close matches
                raise ValueError(str(e)) from None
        return v

    @field_validator("path")
    @classmethod
    def _exists(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        existing_path(v, info)  # given a recipe's folder: it must exist; the path stays as written
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> SourceConfig:
        if (self.builtin is None) == (self.path is None):
            raise ValueError("give exactly one of `builtin` (an ability name) or `path` (a file or folder)")
        if self.path is not None and self.n is not None:
            raise ValueError("`n` applies to built-in sources; take part of a file with the mixture's count or fraction")
        if self.builtin is not None and self.split not in ("train", "test"):
            raise ValueError(f"built-in split must be 'train' or 'test', got {self.split!r}")
        if self.stream and (self.path is None or self.path.suffix != ".jsonl"):
            raise ValueError(f"`stream` reads .jsonl files; this source is "
                             f"{'built in' if self.path is None else repr(str(self.path))}")
        if self.stream and self.select is not None:
            raise ValueError("`select` scores every record with the model, which a streamed source does not hold; "
                             "select from a smaller file, or leave out `stream`")
        return self


def load_source(name: str, cfg: SourceConfig, *, seed: int = 0, base_dir: str | os.PathLike = ".") -> list[dict]:
    """All records of one source, normalised (see the module docstring).

    Raises:
        DataError: the file is missing, unreadable, empty, or a record does not fit.
    """
    return load_source_located(name, cfg, seed=seed, base_dir=base_dir)[0]


def load_source_located(name: str, cfg: SourceConfig, *, seed: int = 0,
                        base_dir: str | os.PathLike = ".") -> tuple[list[dict], list[str]]:
    """:func:`load_source` and, per record, where it came from: ``file:line`` (1-based) for JSONL,
    ``file row i`` for Parquet and ``datasets`` folders, ``source 'name' record i`` (1-based) for
    a built-in source."""
    records, where = _load(name, cfg, seed=seed, base_dir=base_dir)
    if cfg.condition:
        text = next((at for r, at in zip(records, where) if is_text_record(r)), None)
        if text is not None:
            raise DataError(f"{text}: a raw-text record in source {name!r}, which sets condition "
                            f"{cfg.condition!r}; a C-RLFT tag opens conversation turns, so keep raw text in a "
                            f"source of its own")
        records = [r | {"condition": cfg.condition} for r in records]
    return records, where


def _load(name: str, cfg: SourceConfig, *, seed: int, base_dir) -> tuple[list[dict], list[str]]:
    ability = cfg.ability or name
    if cfg.builtin is not None:
        gen = ABILITIES.get(cfg.builtin)
        records = gen.generate(cfg.n or 1000, seed=cfg.seed if cfg.seed is not None else seed,
                               split=cfg.split, difficulty=cfg.difficulty)  # type: ignore[arg-type]
        if cfg.ability:
            records = [r | {"ability": cfg.ability} for r in records]
        return records, [f"source {name!r} record {i}" for i in range(1, len(records) + 1)]
    path = Path(cfg.path)  # type: ignore[arg-type]
    if not path.is_absolute():
        path = Path(base_dir) / path
    if path.suffix == ".jsonl" and path.is_file() and path.stat().st_size > STREAM_HINT_BYTES:
        log.warning(f"source {name!r}: {path} is {path.stat().st_size / 2**30:.1f} GiB, loaded whole into memory; "
                    f"set sources.{name}.stream: true to read it on demand")
    rows = read_rows(path, split=cfg.split, max_record_bytes=cfg.max_record_bytes, name=name)
    jsonl = path.suffix == ".jsonl" and not path.is_dir()  # a JSONL line is measured as it is read
    records, where, empty = [], [], []
    for at, obj in rows:
        record = accept_record(obj, at, name, cfg, measured=jsonl)
        if record is None:
            empty.append(at)
        else:
            records.append(record)
            where.append(at)
    if warning := check_kept(name, path, len(records), len(rows), len(empty), empty[0] if empty else None):
        log.warning(warning)
    return records, where


def accept_record(obj: Any, at: str, name: str, cfg: SourceConfig, *, measured: bool = False) -> dict | None:
    """One raw record of source ``name``, normalised and checked; None when it has an empty assistant
    turn and ``empty_turns`` is ``drop``. ``measured``: its size was checked as it was read.

    Raises:
        DataError: the record does not fit (see :func:`normalise_record`), is too long, or has an
            empty assistant turn and ``empty_turns`` is ``error``.
    """
    record = normalise_record(obj, at, default_ability=cfg.ability or name, system=cfg.system)
    turns = record.get("messages") or [{"role": "assistant", "content": record["text"]}]
    if not measured:
        _check_size(turns, at, name, cfg.max_record_bytes)
    turn = next((i for i, m in enumerate(turns) if m["role"] == "assistant" and not m["content"].strip()), None)
    if turn is None:
        return record
    if cfg.empty_turns == "error":
        what = (f"messages[{turn}] is an empty assistant turn (content {turns[turn]['content']!r})"
                if "messages" in record else f"\"text\" is empty ({record['text']!r})")
        raise DataError(f"{at}: {what}, nothing to train on; fill or remove the record, or set "
                        f"sources.{name}.empty_turns: drop to drop such records")
    return None


def check_kept(name: str, path: Path, kept: int, read: int, dropped: int, first: str | None) -> str | None:
    """The warning to give for the ``dropped`` of ``read`` records that had an empty assistant turn
    (``first``: where the first was), or None.

    Raises:
        DataError: no record is kept.
    """
    if dropped and not kept:
        raise DataError(f"source {name!r}: {path}: every record ({dropped:,}) has an empty assistant "
                        f"turn, so empty_turns: drop leaves nothing to train on")
    if not kept:
        raise DataError(f"source {name!r}: {path}: contains no records")
    if dropped:
        return (f"source {name!r}: dropped {dropped:,} of {read:,} records with an empty assistant turn "
                f"(empty_turns: drop), the first at {first}")
    return None


def read_rows(path: Path, *, split: str = "train", max_record_bytes: int = MAX_RECORD_BYTES,
              name: str = "data") -> list[tuple[str, Any]]:
    """``(where, raw object)`` per record of a ``.jsonl``, ``.parquet`` or ``save_to_disk`` folder,
    ``where`` naming its file and line or row; JSONL lines longer than ``max_record_bytes`` are
    refused as they are read. ``name`` is the config key the messages point to.

    Raises:
        DataError: the path is missing, of another type, or unreadable.
    """
    if not path.exists():
        raise DataError(f"source {name!r}: {path}: no such file or folder")
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if path.suffix == ".jsonl":
        return _read_jsonl(path, name, max_record_bytes)
    if path.suffix == ".json":
        return _read_json(path, name, max_record_bytes)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"source {name!r}: {path}: unsupported file type {path.suffix!r}; expected .jsonl, .json, "
                    f".parquet or a folder saved with datasets' save_to_disk")


def _check_size(messages: list[dict], where: str, name: str, limit: int) -> None:
    chars = sum(len(m["content"]) for m in messages)
    if 4 * chars > limit:  # a character is at most 4 bytes of UTF-8: encode only when it can matter
        size = sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in messages)
        if size > limit:
            raise DataError(f"{where}: record of {size:,} bytes, longer than max_record_bytes = {limit:,}; shorten "
                            f"or remove it, or raise sources.{name}.max_record_bytes")


def _read_jsonl(path: Path, name: str, limit: int) -> list[tuple[str, Any]]:
    """``(file:line, object)`` per non-blank line (:func:`jsonl_lines`)."""
    return [(f"{path}:{lineno}", parse_line(line, path, lineno)) for lineno, _, _, line in jsonl_lines(path, name, limit)]


def jsonl_lines(path: Path, name: str, limit: int) -> Iterator[tuple[int, int, int, str]]:
    """``(line number, byte offset, byte length, text)`` of each non-blank line, the span being the
    record's own bytes (no byte order mark, no line end). Lines are read as bytes, at most ``limit``
    + 2 at a time, so an over-long line is refused without being held whole; only ``\\n`` ends a
    line (a stray ``\\r`` inside a record stays in it, where JSON reports it).

    Raises:
        DataError: a line is longer than ``limit`` bytes or not UTF-8.
    """
    with path.open("rb") as f:
        lineno, pos = 0, 0
        while raw := f.readline(limit + 2):  # + 2: room for the line's own "\r\n"
            lineno += 1
            start, pos = pos, pos + len(raw)
            if raw.endswith(b"\n"):
                raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            if len(raw) > limit:
                raise DataError(f"{path}:{lineno}: record longer than max_record_bytes = {limit:,} bytes (not read "
                                f"further); shorten or remove it, or raise sources.{name}.max_record_bytes")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
                raw, start = raw[3:], start + 3
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                column = len(raw[: e.start].decode("utf-8")) + 1
                raise DataError(
                    f"{path}:{lineno}: not UTF-8: byte 0x{raw[e.start]:02x} at column {column} cannot be decoded; "
                    f"JSONL is read as UTF-8, so re-encode the file (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            if line.strip():
                yield lineno, start, len(raw), line


def parse_line(line: str, path: Path, lineno: int) -> Any:
    """The JSON value of one JSONL line.

    Raises:
        DataError: not valid JSON (file, line and column).
    """
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: {_json_problem(e, line)}") from None


_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def _read_json(path: Path, name: str, limit: int) -> list[tuple[str, Any]]:
    """``(file:line, object)`` per element of a ``.json`` file holding one array of records (the line
    is where the element starts). A file of several values one per line is JSON Lines under a
    ``.json`` name, and is read as such.

    Raises:
        DataError: not UTF-8, not valid JSON (file, line and column), not an array, or an element
            longer than ``limit`` bytes.
    """
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        at = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{at}: not UTF-8: byte 0x{raw[e.start]:02x} cannot "
                        f"be decoded; JSON is read as UTF-8, so re-encode the file (e.g. iconv -f latin1 "
                        f"-t utf-8)") from None
    decoder = json.JSONDecoder()

    def value(pos: int, what: str) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            problem = _json_problem(e, text.splitlines()[e.lineno - 1] if text else "")
            raise DataError(f"{path}:{e.lineno}: {problem}{what}") from None

    pos = _SPACE.match(text).end()
    if pos == len(text):
        return []
    if text[pos] != "[":
        _, end = value(pos, "")
        rest = _SPACE.match(text, end).end()
        if rest < len(text) and "\n" in text[end:rest]:
            return _read_jsonl(path, name, limit)  # JSON Lines named .json
        found = "one object" if text[pos] == "{" else "one value"
        raise DataError(f"{path}: expected a JSON array of records ([{{...}}, {{...}}]) or one record per line, "
                        f"found {found}")
    rows: list[tuple[str, Any]] = []
    pos = _SPACE.match(text, pos + 1).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            line = text.count("\n", 0, pos) + 1 if not rows else line + text.count("\n", last, pos)
            obj, end = value(pos, f" (record {len(rows) + 1} of the array)")
            if end - pos > limit // 4 and len(text[pos:end].encode("utf-8", "surrogatepass")) > limit:
                raise DataError(f"{path}:{line}: record longer than max_record_bytes = {limit:,} bytes; shorten "
                                f"or remove it, or raise sources.{name}.max_record_bytes")
            rows.append((f"{path}:{line}", obj))
            last, pos = pos, _SPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _SPACE.match(text, pos + 1).end()
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: not valid JSON after record {len(rows)} of "
                            f"the array: expected ',' or the closing ']'")
    if _SPACE.match(text, pos).end() != len(text):
        raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: more text after the array's closing ']'")
    return rows


def _json_problem(e: json.JSONDecodeError, line: str) -> str:
    """What is wrong with one JSONL line, at the column where reading it failed (1-based)."""
    if e.msg.startswith("Unterminated string"):  # json names where the string opened, not where it broke
        return (f"not valid JSON at column {len(line) + 1}: the line ends inside a string opened at column "
                f"{e.colno}; one record per line, with line breaks inside strings written as \\n")
    if e.msg.startswith("Invalid control character"):
        return (f"not valid JSON at column {e.colno}: raw control character {line[e.pos]!r} inside a string; "
                f"write it escaped (\\n, \\t, \\r or \\u00XX)")
    if e.msg == "Extra data":
        return f"not valid JSON at column {e.colno}: more text after the record's end (one record per line)"
    what = e.msg.removesuffix(" at")
    return f"not valid JSON at column {e.colno}: {what[:1].lower()}{what[1:]}"


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


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "assistant": "assistant", "model": "assistant", "system": "system"}
"""ShareGPT's ``from`` values and the role each becomes."""


def normalise_record(obj: Any, where: str, *, default_ability: str, system: str | None = None) -> dict:
    """One raw record in any accepted shape -> a chat record. ``where`` names it in errors; ``system``
    is put first when the record has no system turn (see the module docstring)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with a conversation, found {type(obj).__name__}")
    if "messages" in obj:
        messages = [m | {"content": _text_of(m["content"], where, f"messages[{i}].content")}
                    if isinstance(m, dict) and isinstance(m.get("content"), list) else m
                    for i, m in enumerate(obj["messages"])] if isinstance(obj["messages"], list) else obj["messages"]
        rest = {k: v for k, v in obj.items() if k != "messages"}
    elif "conversations" in obj:
        messages = _sharegpt(obj["conversations"], where)
        rest = {k: v for k, v in obj.items() if k != "conversations"}
    elif "prompt" in obj and "chosen" in obj and "rejected" in obj:
        messages = _turns(obj["prompt"], where, "prompt", "user") + _turns(obj["chosen"], where, "chosen", "assistant")
        rejected = _turns(obj["rejected"], where, "rejected", "assistant")
        _check_messages(rejected, where)
        if len(rejected) != 1:
            raise DataError(f'{where}: "rejected" must be a string or a list holding one assistant turn')
        rest = {k: v for k, v in obj.items() if k not in ("prompt", "chosen", "rejected")}
        rest["rejected"] = rejected[0]["content"]
    elif "prompt" in obj and "completion" in obj:
        messages = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
        rest = {k: v for k, v in obj.items() if k not in ("prompt", "completion")}
    elif "instruction" in obj and "output" in obj:
        extra = obj.get("input")
        user = obj["instruction"] if not extra else f"{obj['instruction']}\n\n{extra}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
        rest = {k: v for k, v in obj.items() if k not in ("instruction", "input", "output")}
    elif "text" in obj:
        return _text_record(obj, where, default_ability)
    else:
        raise DataError(
            f"{where}: no conversation found; keys present: {', '.join(map(str, obj)) or '(none)'}. Expected "
            f'"messages" (a list of {{"role", "content"}}), "conversations" (ShareGPT), "prompt" + "completion", '
            f'"prompt" + "chosen" + "rejected" (preference pairs), '
            f'"instruction" + "output", or "text" (raw text, for continued pretraining)'
        )
    own = rest.pop("system", None)
    if own is not None and not isinstance(own, str):
        raise DataError(f"{where}: \"system\" must be a string (the system prompt), found {type(own).__name__}")
    if isinstance(messages, list) and (own or system) and not any(
            isinstance(m, dict) and m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": own or system}] + messages
    elif own and isinstance(messages, list):
        raise DataError(f"{where}: both a \"system\" field and a system turn; keep one")
    _check_messages(messages, where)
    ability = rest.get("ability", default_ability)
    if not isinstance(ability, str) or not ability:
        raise DataError(f"{where}: \"ability\" must be a non-empty string, found {ability!r}")
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return rest | {"messages": clean, "ability": ability}


def _turns(value: Any, where: str, key: str, role: str) -> list[dict]:
    """A preference field as turns: a string is one ``role`` turn; a list is turns (content parts joined)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f'{where}: "{key}" must be a string or a non-empty list of turns, found {value!r:.80}')
    return [m | {"content": _text_of(m["content"], where, f"{key}[{i}].content")}
            if isinstance(m, dict) and isinstance(m.get("content"), list) else m for i, m in enumerate(value)]


def _text_record(obj: dict, where: str, default_ability: str) -> dict:
    """A raw-text record (continued pretraining), checked: ``{"text": str, "ability": str, ...}``."""
    if not isinstance(obj["text"], str):
        raise DataError(f"{where}: \"text\" must be a string (raw text), found {type(obj['text']).__name__}")
    if "system" in obj:
        raise DataError(f"{where}: a raw-text record has no turns, so its \"system\" field has nowhere to go; "
                        f"drop it, or write the record as a conversation")
    ability = obj.get("ability", default_ability)
    if not isinstance(ability, str) or not ability:
        raise DataError(f"{where}: \"ability\" must be a non-empty string, found {ability!r}")
    return obj | {"ability": ability}


def is_text_record(record: dict) -> bool:
    """Whether a normalised record is raw text (continued pretraining) rather than a conversation."""
    return "messages" not in record


def _text_of(parts: list, where: str, key: str) -> str:
    """The text of OpenAI-style content parts, joined without a separator (as chat templates render a
    list of text parts); a part of another type (an image, audio) is an error naming it."""
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise DataError(f"{where}: {key}[{j}] is a {kind!r} part; mixtune trains text models, so content parts "
                            f'must be {{"type": "text", "text": ...}}')
        texts.append(part["text"])
    return "".join(texts)


def _sharegpt(turns: Any, where: str) -> list[dict]:
    """ShareGPT's ``conversations`` as messages (:data:`SHAREGPT_ROLES`)."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: \"conversations\" must be a non-empty list of turns, found {turns!r:.80}")
    out = []
    for i, t in enumerate(turns):
        if isinstance(t, dict) and "from" in t and "value" in t:
            who, text = t["from"], t["value"]
        elif isinstance(t, dict) and "role" in t and "content" in t:
            who, text = t["role"], t["content"]
        else:
            raise DataError(f'{where}: conversations[{i}] must be an object with "from" and "value" (ShareGPT), '
                            f"found {t!r:.80}")
        if who not in SHAREGPT_ROLES:
            raise DataError(f"{where}: conversations[{i}].from = {who!r}; expected one of "
                            f"{', '.join(SHAREGPT_ROLES)} (tool and function turns are not trained)")
        out.append({"role": SHAREGPT_ROLES[who],
                    "content": _text_of(text, where, f"conversations[{i}].value") if isinstance(text, list) else text})
    return out


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


__all__ = ["MAX_RECORD_BYTES", "ROLES", "SHAREGPT_ROLES", "STREAM_HINT_BYTES", "SourceConfig", "accept_record",
           "check_kept", "is_text_record", "jsonl_lines", "load_source", "load_source_located", "normalise_record",
           "parse_line", "read_rows"]
