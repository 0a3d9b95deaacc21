import json

import pytest

from mixtune.core import ConfigError, DataError, validate
from mixtune.data.sources import SourceConfig, load_source

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "answer": "x"}


def src(**kw) -> SourceConfig:
    return validate(SourceConfig, kw)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_all_three_shapes_normalise(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [
        CHAT,
        {"prompt": "2+2?", "completion": "4", "id": 7},
        {"instruction": "Add", "input": "2 and 2", "output": "4", "ability": "math"},
        "",  # blank lines are skipped
    ])
    recs = load_source("mine", src(path=p))
    assert recs[0] == CHAT | {"ability": "mine"}
    assert recs[1] == {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                       "id": 7, "ability": "mine"}
    assert recs[2]["messages"][0]["content"] == "Add\n\n2 and 2"
    assert recs[2]["ability"] == "math"


def test_ability_setting_tags_records_without_one(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [CHAT])
    assert load_source("s", src(path=p, ability="chat"))[0]["ability"] == "chat"


def test_parquet_and_saved_dataset_give_the_same_records(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [CHAT, CHAT | {"answer": "y"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    expected = [r | {"ability": "s"} for r in rows]
    assert load_source("s", src(path=tmp_path / "d.parquet")) == expected
    assert load_source("s", src(path=tmp_path / "ds")) == expected
    assert load_source("s", src(path=tmp_path / "single")) == expected
    with pytest.raises(DataError, match="has no split 'test'; splits: train"):
        load_source("s", src(path=tmp_path / "ds", split="test"))


def test_relative_paths_are_taken_from_base_dir(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [CHAT])
    assert len(load_source("s", src(path="d.jsonl"), base_dir=tmp_path)) == 1


def test_builtin_source_uses_recipe_seed_unless_given():
    a = load_source("m", src(builtin="math", n=5), seed=1)
    assert a == load_source("m", src(builtin="math", n=5, seed=1), seed=99)
    assert a != load_source("m", src(builtin="math", n=5), seed=2)
    assert all(r["ability"] == "math" for r in a)


@pytest.mark.parametrize("line, expected", [
    ('{"messages": [}', r"d.jsonl:2: not valid JSON \(Expecting value at column 15\)"),
    ('[1, 2]', r"d.jsonl:2: expected an object with a conversation, found list"),
    ('{"question": "q", "answer": "a"}',
     r'd.jsonl:2: no conversation found; keys present: question, answer. Expected "messages"'),
    ('{"messages": []}', r'd.jsonl:2: "messages" must be a non-empty list'),
    ('{"messages": [{"role": "bot", "content": "x"}]}',
     r"d.jsonl:2: messages\[0\].role = 'bot'; expected one of system, user, assistant"),
    ('{"messages": [{"role": "user", "content": 3}]}', r"d.jsonl:2: messages\[0\].content must be a string, found int"),
    ('{"messages": [{"role": "user"}]}', r'd.jsonl:2: messages\[0\] must be an object with "role" and "content"'),
    ('{"messages": [{"role": "user", "content": "q"}]}', r"d.jsonl:2: no assistant turn"),
    ('{"prompt": "p", "completion": "c", "ability": 5}', r'd.jsonl:2: "ability" must be a non-empty string'),
])
def test_bad_jsonl_names_file_line_and_problem(tmp_path, line, expected):
    p = write_jsonl(tmp_path / "d.jsonl", [CHAT, line])
    with pytest.raises(DataError, match=expected):
        load_source("s", src(path=p))


def test_bad_parquet_row_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": None}]),
                   tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet row 1: messages\[1\].content must be a string, found NoneType"):
        load_source("s", src(path=tmp_path / "d.parquet"))


def test_corrupt_parquet_and_missing_and_unsupported_files(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="bad.parquet: cannot read as Parquet"):
        load_source("s", src(path=tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match="source 's': .*nope.jsonl: no such file"):
        load_source("s", src(path=tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported file type '.csv'; expected .jsonl, .parquet"):
        load_source("s", src(path=tmp_path / "d.csv"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="contains no records"):
        load_source("s", src(path=tmp_path / "empty.jsonl"))
    (tmp_path / "notds").mkdir()
    with pytest.raises(DataError, match="not a folder written by datasets' save_to_disk"):
        load_source("s", src(path=tmp_path / "notds"))


def test_source_config_rules():
    with pytest.raises(ConfigError, match="exactly one of `builtin`"):
        src()
    with pytest.raises(ConfigError, match="exactly one of `builtin`"):
        src(builtin="math", path="x.jsonl")
    with pytest.raises(ConfigError, match="`n` applies to built-in sources"):
        src(path="x.jsonl", n=3)
    with pytest.raises(ConfigError, match="built-in split must be 'train' or 'test'"):
        src(builtin="math", split="dev")
    with pytest.raises(ConfigError, match="unknown ability 'maths'. Did you mean: math"):
        load_source("m", src(builtin="maths"))
