"""Streamed sources (``stream: true``): the same records, rows and training as the in-memory path,
from caches that are reused and never look complete when a build was cut short."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mixtune.core import ConfigError, DataError, validate
from mixtune.data.format import IGNORE
from mixtune.data.sources import SourceConfig, load_source_located
from mixtune.data.stream import open_streamed
from mixtune.pipeline import prepare_data
from mixtune.recipe import Recipe

FIELDS = ("input_ids", "labels", "position_ids", "source_ids", "example_ids")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "mixtune" / "data"


def records(n=120, seed=0):
    """Conversations and raw text, a third of it longer than a 96-token row (so cut into pieces)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"text": f"Document {i}. " + "Alloys are mixtures of metals. " * int(rng.integers(1, 30))})
        else:
            out.append({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                     {"role": "assistant", "content": f"{2 * i}. " * int(rng.integers(1, 8))}]})
    return out


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def recipe(stream, **extra):
    return validate(Recipe, {"model": "builtin:tiny", "format": {"seq_len": 96},
                             "sources": {"docs": {"path": "d.jsonl", "stream": stream},
                                         "math": {"builtin": "math", "n": 40}}} | extra)


def assert_same_rows(a, b):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype == torch.long and torch.equal(x, y), f
    assert (a.dropped, a.truncated) == (b.dropped, b.truncated)


def mapped_file(t: torch.Tensor) -> str:
    """The file mapped where the tensor's data lies (Linux), else ""."""
    for line in open("/proc/self/maps"):
        span, *rest = line.split()
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= t.data_ptr() < hi:
            return rest[4] if len(rest) > 4 else ""
    return ""


STRATEGIES = {
    "one mixture, streamed and in-memory sources together": {},
    "dmt: a stage of the in-memory source alone, then both": {"strategy": {"name": "dmt", "k": 0.25, "general": "docs"}},
    "grouped mixing: sources packed apart, validation rows": {
        "strategy": {"name": "multi_task", "mixing": {"name": "stratified", "validation": 3}}},
}


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
def test_streamed_stages_have_the_in_memory_rows_bitwise(tmp_path, tokenizer, strategy):
    write_jsonl(tmp_path / "d.jsonl", records())
    a = prepare_data(recipe(False, **strategy), tmp_path, tokenizer)
    b = prepare_data(recipe(True, **strategy), tmp_path, tokenizer)
    assert len(a.stages) == len(b.stages) >= 1
    cut = 0
    for sa, sb in zip(a.stages, b.stages):
        assert_same_rows(sa.packed, sb.packed)
        assert sa.mixture.picks == list(sb.mixture.picks) and sa.mixture.records == list(sb.mixture.records)
        assert sa.examples == list(sb.examples)
        if sa.groups is not None:
            assert [r.tolist() for r in sa.groups.rows] == [r.tolist() for r in sb.groups.rows]
            for va, vb in zip(sa.groups.val, sb.groups.val):
                assert_same_rows(va, vb)
        cut += sum(e.divisible and len(e.input_ids) > 96 for e in sa.examples)
    assert cut > 5  # long raw text was cut into rows, in both
    streamed = next(s for s in b.stages if "docs" in s.config.mixture.sources)
    assert mapped_file(streamed.packed.input_ids).endswith("input_ids.i64")  # the rows are views of a file
    rows = torch.tensor([3, 0, 3])  # what the loop does with them: index a batch of rows
    assert torch.equal(streamed.packed.labels[rows], a.stages[b.stages.index(streamed)].packed.labels[rows])


def test_a_subset_of_a_streamed_source_is_the_in_memory_subset(tmp_path, tokenizer):
    write_jsonl(tmp_path / "d.jsonl", records())
    a = prepare_data(recipe(False), tmp_path, tokenizer, amount=0.5, amount_skip={"math"})
    b = prepare_data(recipe(True), tmp_path, tokenizer, amount=0.5, amount_skip={"math"})
    assert [o.available for o in b.stages[0].mixture.outcomes] == [60, 40]
    assert_same_rows(a.stages[0].packed, b.stages[0].packed)


def test_streamed_records_are_the_loaded_records_and_name_their_line(tmp_path, caplog):
    rows = [json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}),
            "", "  ", json.dumps({"prompt": "2+2?", "completion": "4", "id": 7}),
            json.dumps({"prompt": "empty", "completion": " "}), json.dumps({"text": "é raw text ☃"})]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n")  # a byte order mark, Windows line ends
    cfg = validate(SourceConfig, {"path": str(path), "system": "Be brief.", "empty_turns": "drop", "stream": True})
    caplog.set_level(logging.WARNING)
    loaded, where = load_source_located("s", cfg)
    in_memory_warning = caplog.messages[-1]
    streamed = open_streamed("s", cfg)
    assert list(streamed) == loaded and [streamed.where(i) for i in range(len(streamed))] == where
    assert where == [f"{path}:1", f"{path}:4", f"{path}:6"]
    assert caplog.messages[-1] == in_memory_warning and "the first at " + f"{path}:5" in in_memory_warning
    half = streamed.subset(np.array([0, 2]))
    assert list(half) == [loaded[0], loaded[2]] and half.where(1) == f"{path}:6"
    tagged = validate(SourceConfig, {"path": str(path), "condition": "GPT4", "empty_turns": "drop", "stream": True})
    with pytest.raises(DataError, match=rf"^{path}:6: a raw-text record in source 's', which sets condition 'GPT4'"):
        open_streamed("s", tagged)


def test_a_bad_record_is_reported_at_its_line_as_when_loaded(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [records()[1], records()[2], '{"messages": [}'])
    cfg = {"path": str(path), "stream": True}
    with pytest.raises(DataError) as loaded:
        load_source_located("s", validate(SourceConfig, cfg | {"stream": False}))
    with pytest.raises(DataError) as streamed:
        open_streamed("s", validate(SourceConfig, cfg))
    assert str(streamed.value) == str(loaded.value) and str(loaded.value).startswith(f"{path}:3: not valid JSON")
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "q", "completion": ""}])
    with pytest.raises(DataError, match=rf"^{empty}:1: messages\[1\] is an empty assistant turn"):
        open_streamed("s", validate(SourceConfig, {"path": str(empty), "stream": True}))


def test_a_long_record_is_named_by_file_and_line_when_packing(tmp_path):
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]}
    write_jsonl(tmp_path / "d.jsonl", [records()[1], "", long])
    pattern = rf"^{tmp_path / 'd.jsonl'}:3 has \d+ tokens, longer than seq_len = 96"
    with pytest.raises(DataError, match=pattern):
        prepare_data(recipe(True), tmp_path)
    with pytest.raises(DataError, match=pattern):
        prepare_data(recipe(True, strategy={"name": "multi_task", "mixing": {"name": "stratified", "validation": 1}}),
                     tmp_path)


def test_stream_is_for_jsonl_files_and_not_with_select(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match="`stream` reads .jsonl files"):
        validate(SourceConfig, {"path": str(tmp_path / "d.parquet"), "stream": True})
    with pytest.raises(ConfigError, match="`stream` reads .jsonl files; this source is built in"):
        validate(SourceConfig, {"builtin": "math", "stream": True})
    write_jsonl(tmp_path / "d.jsonl", records(3))
    with pytest.raises(ConfigError, match="`select` scores every record"):
        validate(SourceConfig, {"path": str(tmp_path / "d.jsonl"), "stream": True, "select": {"method": "grape"}})


def test_stream_is_left_out_of_dumps_at_its_default(tmp_path):
    """A study hashes each source's dump into its stage keys: adding the field must not change them."""
    write_jsonl(tmp_path / "d.jsonl", records(3))
    plain = validate(SourceConfig, {"path": str(tmp_path / "d.jsonl")}).model_dump(mode="json")
    assert "stream" not in plain and set(plain) == set(SourceConfig.model_fields) - {"stream"}
    on = validate(SourceConfig, {"path": str(tmp_path / "d.jsonl"), "stream": True})
    assert on.model_dump(mode="json") == plain | {"stream": True}  # saved with the run when it is on
    assert validate(SourceConfig, on.model_dump(mode="json")).stream


def test_two_runs_give_the_same_rows_and_mixtures(tmp_path, tokenizer, monkeypatch):
    write_jsonl(tmp_path / "d.jsonl", records())
    a = prepare_data(recipe(True), tmp_path, tokenizer)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "another-cache"))  # built again from nothing
    b = prepare_data(recipe(True), tmp_path, tokenizer)
    assert_same_rows(a.stages[0].packed, b.stages[0].packed)
    assert list(a.stages[0].mixture.picks) == list(b.stages[0].mixture.picks)
    other = prepare_data(recipe(True, seed=1), tmp_path, tokenizer)  # the seed does change the draw
    assert list(other.stages[0].mixture.picks) != list(a.stages[0].mixture.picks)


def test_a_second_run_reuses_every_cache(tmp_path, tokenizer, cache, monkeypatch):
    import mixtune.data.packed_files as packed_files
    import mixtune.data.stream as stream
    import mixtune.data.tokens as tokens

    write_jsonl(tmp_path / "d.jsonl", records())
    first = prepare_data(recipe(True), tmp_path, tokenizer)
    built = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    assert {p.parent.parent.name for p in built} == {"index", "tokens", "packed"}

    def rebuilt(*_):
        raise AssertionError("a cache was rebuilt")

    for module, name in ((stream, "_index"), (tokens, "_tokenize"), (packed_files, "_write")):
        monkeypatch.setattr(module, name, rebuilt)
    again = prepare_data(recipe(True), tmp_path, tokenizer)
    assert_same_rows(first.stages[0].packed, again.stages[0].packed)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == built
    # a changed file is a new index (its size and modification time are in the key)
    monkeypatch.undo()
    os.environ["XDG_CACHE_HOME"] = str(cache.parent.parent)  # undo() also restored the variable
    write_jsonl(tmp_path / "d.jsonl", records(150))
    assert len(prepare_data(recipe(True), tmp_path, tokenizer).stages[0].mixture.picks) == 190


def complete(cache):
    """Cached folders under their final name (a leading dot marks one still being written)."""
    return sorted(p.relative_to(cache) for p in cache.glob("*/*") if not p.name.startswith("."))


def test_an_interrupted_build_leaves_no_cache_that_looks_complete(tmp_path, tokenizer, cache, monkeypatch):
    import mixtune.data.packed_files as packed_files
    import mixtune.data.tokens as tokens

    write_jsonl(tmp_path / "d.jsonl", records())
    expected = prepare_data(recipe(False), tmp_path, tokenizer).stages[0].packed

    class Crash(Exception):
        pass

    def failing(real, after):
        calls = []

        def call(*args, **kw):
            calls.append(1)
            if len(calls) > after:
                raise Crash
            return real(*args, **kw)
        return call

    monkeypatch.setattr(tokens, "CHUNK_BYTES", 500)  # many chunks; fail on the third
    monkeypatch.setattr(tokens, "tokenize_records", failing(tokens.tokenize_records, 2))
    with pytest.raises(Crash):
        prepare_data(recipe(True), tmp_path, tokenizer)
    assert [p.parts[0] for p in complete(cache)] == ["index"]  # the index was done; no tokens
    assert not list(cache.glob("*/.*"))  # and the partial folder is gone
    monkeypatch.undo()
    os.environ["XDG_CACHE_HOME"] = str(cache.parent.parent)

    monkeypatch.setattr(packed_files, "BLOCK_TOKENS", 96 * 4)  # rows written 4 at a time; fail on the third block
    monkeypatch.setattr(packed_files, "fill_rows", failing(packed_files.fill_rows, 2))
    with pytest.raises(Crash):
        prepare_data(recipe(True), tmp_path, tokenizer)
    assert [p.parts[0] for p in complete(cache)] == ["index", "tokens"] and not list(cache.glob("*/.*"))
    monkeypatch.undo()
    os.environ["XDG_CACHE_HOME"] = str(cache.parent.parent)
    assert_same_rows(prepare_data(recipe(True), tmp_path, tokenizer).stages[0].packed, expected)


def test_a_process_killed_while_writing_rows_leaves_only_a_partial_folder(tmp_path, tokenizer, cache):
    write_jsonl(tmp_path / "d.jsonl", records())
    child = textwrap.dedent(f"""
        import os, signal
        import mixtune.data.packed_files as pf
        from mixtune.core import validate
        from mixtune.pipeline import prepare_data
        from mixtune.recipe import Recipe
        real = pf.fill_rows
        def fill(*a, **k):
            if a[3] > 0:  # the second block: kill -9, no clean-up runs
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        pf.fill_rows, pf.BLOCK_TOKENS = fill, 96 * 4
        prepare_data(validate(Recipe, {recipe(True).model_dump(mode="json")!r}), {str(tmp_path)!r})
    """)
    env = os.environ | {"XDG_CACHE_HOME": str(cache.parent.parent)}
    assert subprocess.run([sys.executable, "-c", child], env=env).returncode == -9
    assert [p.parts[0] for p in complete(cache)] == ["index", "tokens"]
    [partial] = cache.glob("packed/.*")
    assert partial.name.endswith(".partial") and not (partial / "meta.json").exists()
    again = prepare_data(recipe(True), tmp_path, tokenizer).stages[0].packed  # built anew beside it
    assert_same_rows(again, prepare_data(recipe(False), tmp_path, tokenizer).stages[0].packed)


def test_streamed_data_trains_and_resumes_as_in_memory_data_bitwise(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    from mixtune.pipeline import run_training

    write_jsonl(tmp_path / "d.jsonl", records())

    def run(stream, out, on_step=None):
        r = validate(Recipe, recipe(stream).model_dump(mode="json") | {
            "model": str(tiny_dir), "run": {"save_every": 3},
            "train": {"lr": 1e-3, "steps": 6, "batch_size": 8, "micro_batch_size": 4, "precision": "fp32"}})
        return run_training(r, tmp_path, out, progress=False, on_step=on_step)

    [full] = run(False, tmp_path / "memory")

    def kill_at_5(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(True, tmp_path / "streamed", on_step=kill_at_5)
    assert (tmp_path / "streamed" / "checkpoints" / "step-0000003").exists()
    [resumed] = run(True, tmp_path / "streamed")  # from the checkpoint at step 3, rows from the cached files
    assert "resuming from " + str(tmp_path / "streamed" / "checkpoints" / "step-0000003") in (
        tmp_path / "streamed" / "log.jsonl").read_text()
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    labels = prepare_data(recipe(True), tmp_path).stages[0].packed.labels
    assert int((labels != IGNORE).sum()) > 1000  # it trained on real tokens
