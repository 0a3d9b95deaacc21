import json

import pytest

from mixtune.core import ConfigError, DataError, validate
from mixtune.data.format import IGNORE
from mixtune.data.sources import SourceConfig, is_text_record, load_source

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
    ('{"messages": [}', r"d.jsonl:2: not valid JSON at column 15: expecting value$"),
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
    with pytest.raises(DataError, match=r"unsupported file type '.csv'; expected .jsonl, .json, .parquet"):
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


def test_json_error_names_the_column_where_the_line_broke(tmp_path):
    rec = json.dumps({"messages": [{"role": "user", "content": "q" * 100}, {"role": "assistant", "content": "a" * 150}]})
    opened = rec.index('"aaa') + 1  # 1-based column of the quote that opens the assistant text
    assert opened < 221 < rec.index('a"')  # column 222 falls inside that string
    p = write_jsonl(tmp_path / "d.jsonl", [CHAT, rec[:221], rec[221:]])  # the record broken by a raw newline
    with pytest.raises(DataError) as e:
        load_source("s", src(path=p))
    assert str(e.value) == (f"{p}:2: not valid JSON at column 222: the line ends inside a string opened at column "
                            f"{opened}; one record per line, with line breaks inside strings written as \\n")
    tab = '{"prompt": "a\tb", "completion": "c"}'
    with pytest.raises(DataError, match=r"d.jsonl:1: not valid JSON at column 14: raw control character '\\t'"):
        load_source("s", src(path=write_jsonl(tmp_path / "d.jsonl", [tab])))
    with pytest.raises(DataError, match=r"d.jsonl:1: not valid JSON at column 36: more text after the record's end"):
        load_source("s", src(path=write_jsonl(tmp_path / "d.jsonl", ['{"prompt": "p", "completion": "c"} {}'])))


def test_non_utf8_bytes_name_file_line_and_column(tmp_path):
    p = tmp_path / "d.jsonl"
    # line 2: "é" is valid UTF-8 (2 bytes, 1 column); \xe9 alone (Latin-1 "é") is not, at column 17
    p.write_bytes(json.dumps(CHAT).encode() + b'\n{"prompt": "\xc3\xa9caf\xe9", "completion": "c"}\n')
    with pytest.raises(DataError) as e:
        load_source("s", src(path=p))
    assert str(e.value) == (f"{p}:2: not UTF-8: byte 0xe9 at column 17 cannot be decoded; JSONL is read as UTF-8, "
                            f"so re-encode the file (e.g. iconv -f latin1 -t utf-8)")


def test_utf8_byte_order_mark_and_crlf_are_accepted(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(CHAT).encode() + b"\r\n" + json.dumps(CHAT).encode() + b"\r\n")
    assert load_source("s", src(path=p)) == [CHAT | {"ability": "s"}] * 2


EMPTY = {"prompt": "p", "completion": " \n"}


def test_empty_assistant_turn_is_an_error_naming_its_line(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [CHAT, CHAT, EMPTY])
    with pytest.raises(DataError) as e:
        load_source("mine", src(path=p))
    assert str(e.value) == (f"{p}:3: messages[1] is an empty assistant turn (content ' \\n'), nothing to train on; "
                            f"fill or remove the record, or set sources.mine.empty_turns: drop to drop such records")
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
                          {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}
    with pytest.raises(DataError, match=r"d.jsonl:1: messages\[1\] is an empty assistant turn \(content ''\)"):
        load_source("mine", src(path=write_jsonl(tmp_path / "d.jsonl", [multi])))


def test_empty_turns_drop_drops_and_reports_how_many(tmp_path, caplog):
    p = write_jsonl(tmp_path / "d.jsonl", [CHAT, EMPTY, CHAT, EMPTY])
    with caplog.at_level("WARNING", logger="mixtune.data.sources"):
        recs = load_source("mine", src(path=p, empty_turns="drop"))
    assert recs == [CHAT | {"ability": "mine"}] * 2
    assert caplog.messages == [f"source 'mine': dropped 2 of 4 records with an empty assistant turn "
                               f"(empty_turns: drop), the first at {p}:2"]
    with pytest.raises(DataError, match=r"every record \(1\) has an empty assistant turn, so empty_turns: drop"):
        load_source("mine", src(path=write_jsonl(tmp_path / "e.jsonl", [EMPTY]), empty_turns="drop"))
    with pytest.raises(ConfigError, match="empty_turns"):
        src(path=p, empty_turns="skip")


def test_over_long_record_is_refused_when_read_naming_its_line(tmp_path):
    ok = json.dumps({"prompt": "p", "completion": "c" * 67})  # 100 bytes
    assert len(ok) == 100
    p = tmp_path / "d.jsonl"
    p.write_bytes((ok + "\r\n" + ok + "\n\n" + ok[:-1] + ' }\n').encode())  # lines 1, 2 fit; line 4 has 101 bytes
    with pytest.raises(DataError) as e:
        load_source("mine", src(path=p, max_record_bytes=100))
    assert str(e.value) == (f"{p}:4: record longer than max_record_bytes = 100 bytes (not read further); shorten or "
                            f"remove it, or raise sources.mine.max_record_bytes")
    assert len(load_source("mine", src(path=p, max_record_bytes=101))) == 3


def test_a_huge_line_is_refused_without_being_read_whole(tmp_path):
    import tracemalloc

    from mixtune.data.sources import MAX_RECORD_BYTES

    p = tmp_path / "d.jsonl"
    with p.open("wb") as f:  # line 2: one 16 MiB record
        f.write(json.dumps(CHAT).encode() + b'\n{"prompt": "p", "completion": "' + b"x" * 2**24 + b'"}\n')
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=rf"d.jsonl:2: record longer than max_record_bytes = 65,536 bytes"):
            load_source("s", src(path=p, max_record_bytes=2**16))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # at most the limit (64 KiB) was held, not the 16 MiB line
    assert MAX_RECORD_BYTES == 4 * 2**20 == src(path=p).max_record_bytes
    with pytest.raises(DataError, match=r"d.jsonl:2: record longer than max_record_bytes = 4,194,304 bytes"):
        load_source("s", src(path=p))  # the default


def test_over_long_parquet_row_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": "é" * 60}]),
                   tmp_path / "d.parquet")
    with pytest.raises(DataError) as e:
        load_source("mine", src(path=tmp_path / "d.parquet", max_record_bytes=100))
    assert str(e.value) == (f"{tmp_path / 'd.parquet'} row 1: record of 121 bytes, longer than max_record_bytes = "
                            f"100; shorten or remove it, or raise sources.mine.max_record_bytes")


def test_pack_error_names_the_file_line_of_the_long_record(tmp_path):
    from mixtune.pipeline import prepare_data
    from mixtune.recipe import Recipe

    write_jsonl(tmp_path / "d.jsonl", [CHAT, "", CHAT | {"messages": [{"role": "user", "content": "hi"},
                                                                    {"role": "assistant", "content": "word " * 200}]}])
    recipe = validate(Recipe, {"model": "builtin:tiny", "format": {"seq_len": 64},
                               "sources": {"mine": {"path": "d.jsonl"}, "math": {"builtin": "math", "n": 3}}})
    with pytest.raises(DataError, match=rf"^{tmp_path / 'd.jsonl'}:3 has \d+ tokens, longer than seq_len = 64"):
        prepare_data(recipe, tmp_path)
    mixing = {"name": "multi_task", "mixing": {"name": "stratified", "validation": 1}}
    with pytest.raises(DataError, match=rf"^{tmp_path / 'd.jsonl'}:3 has \d+ tokens, longer than seq_len = 64"):
        prepare_data(validate(Recipe, recipe.model_dump() | {"strategy": mixing}), tmp_path)


# --- the formats people download, with their real field names ----------------------------------

def test_sharegpt_conversations_with_a_system_prompt_and_several_turns(tmp_path):
    """ShareGPT as the Vicuna / SlimOrca / OpenHermes files have it: "conversations" of {"from", "value"}."""
    p = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"id": "a1", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                       {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "2+2?"},
                                       {"from": "gpt", "value": "4"}]},
        {"conversations": [{"from": "user", "value": "Hey"}, {"from": "chatgpt", "value": "Hi!"}], "system": "Kind."},
    ])
    a, b = load_source("s", src(path=p))
    assert a["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "4"}]
    assert a["id"] == "a1" and "conversations" not in a
    assert b["messages"][0] == {"role": "system", "content": "Kind."} and "system" not in b
    bad = write_jsonl(tmp_path / "tool.jsonl", [{"conversations": [{"from": "human", "value": "x"},
                                                                  {"from": "observation", "value": "y"}]}])
    with pytest.raises(DataError, match=r"tool.jsonl:1: conversations\[1\].from = 'observation'; expected one of human"):
        load_source("s", src(path=bad))
    shape = write_jsonl(tmp_path / "shape.jsonl", [{"conversations": [{"speaker": "human", "text": "x"}]}])
    with pytest.raises(DataError, match=r'shape.jsonl:1: conversations\[0\] must be an object with "from" and "value"'):
        load_source("s", src(path=shape))


def test_openai_content_parts_are_joined_and_other_parts_refused(tmp_path):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Name "},
                                                        {"type": "text", "text": "a colour."}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                          {"role": "assistant", "content": "A cat."}]}
    p = write_jsonl(tmp_path / "parts.jsonl", [parts, image])
    with pytest.raises(DataError, match=r"parts.jsonl:2: messages\[0\].content\[0\] is a 'image_url' part"):
        load_source("s", src(path=p))
    write_jsonl(p, [parts])
    assert load_source("s", src(path=p))[0]["messages"] == [{"role": "user", "content": "Name a colour."},
                                                           {"role": "assistant", "content": "Blue."}]


def test_a_json_array_file_as_the_alpaca_dataset_ships(tmp_path):
    """alpaca_data.json: one indented JSON array of {"instruction", "input", "output"}."""
    rows = [{"instruction": "Give three tips.", "input": "", "output": "1. Eat. 2. Move. 3. Sleep."},
            {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
            {"instruction": "Add.", "input": "2, 2", "output": "4", "system": "You are a calculator."}]
    p = tmp_path / "alpaca_data.json"
    p.write_text(json.dumps(rows, indent=4))
    recs = load_source("alpaca", src(path=p))
    assert [r["messages"][-1]["content"] for r in recs] == ["1. Eat. 2. Move. 3. Sleep.", "hello", "4"]
    assert recs[0]["messages"][0] == {"role": "user", "content": "Give three tips."}  # empty input: no blank line
    assert recs[2]["messages"][0] == {"role": "system", "content": "You are a calculator."}
    # errors name the line where the record starts
    rows[1] = {"instruction": "Translate.", "response": "hello"}
    p.write_text(json.dumps(rows, indent=4))
    with pytest.raises(DataError, match=r"alpaca_data.json:7: no conversation found; keys present: instruction, response"):
        load_source("alpaca", src(path=p))
    p.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c" "completion": "d"}\n]')
    with pytest.raises(DataError, match=r"alpaca_data.json:3: not valid JSON at column 18: expecting ',' delimiter "
                                        r"\(record 2 of the array\)"):
        load_source("alpaca", src(path=p))
    p.write_text('{"data": []}')
    with pytest.raises(DataError, match=r"expected a JSON array of records .* found one object"):
        load_source("alpaca", src(path=p))
    p.write_text("[]")
    with pytest.raises(DataError, match="contains no records"):
        load_source("alpaca", src(path=p))


def test_a_json_file_of_json_lines_is_read_as_jsonl(tmp_path):
    p = write_jsonl(tmp_path / "data.json", [CHAT, {"prompt": "2+2?", "completion": "4"}])
    assert [len(r["messages"]) for r in load_source("s", src(path=p))] == [2, 2]


def test_the_source_system_prompt_goes_first_where_a_record_has_none(tmp_path):
    own = {"messages": [{"role": "system", "content": "Mine."}] + CHAT["messages"]}
    p = write_jsonl(tmp_path / "d.jsonl", [CHAT, own])
    a, b = load_source("s", src(path=p, system="Answer in French."))
    assert a["messages"][0] == {"role": "system", "content": "Answer in French."} and len(a["messages"]) == 3
    assert b["messages"] == own["messages"]
    both = write_jsonl(tmp_path / "both.jsonl", [own | {"system": "Other."}])
    with pytest.raises(DataError, match=r'both.jsonl:1: both a "system" field and a system turn'):
        load_source("s", src(path=both))


def test_raw_text_records_for_continued_pretraining(tmp_path):
    p = write_jsonl(tmp_path / "domain.jsonl", [{"text": "Alloys are mixtures of metals.", "url": "u1"},
                                                {"text": "Steel is iron and carbon."}])
    a, b = load_source("domain", src(path=p))
    assert a == {"text": "Alloys are mixtures of metals.", "url": "u1", "ability": "domain"}
    assert is_text_record(a) and not is_text_record(load_source("s", src(path=write_jsonl(tmp_path / "c.jsonl",
                                                                                          [CHAT])))[0])
    write_jsonl(p, [{"text": "fine"}, {"text": "   "}])
    with pytest.raises(DataError, match=r"domain.jsonl:2: \"text\" is empty \('   '\), nothing to train on"):
        load_source("domain", src(path=p))
    assert len(load_source("domain", src(path=p, empty_turns="drop"))) == 1
    write_jsonl(p, [{"text": ["a", "b"]}])
    with pytest.raises(DataError, match=r"domain.jsonl:1: \"text\" must be a string \(raw text\), found list"):
        load_source("domain", src(path=p))
    write_jsonl(p, [{"text": "x"}])
    with pytest.raises(DataError, match=r"domain.jsonl:1: a raw-text record in source 'domain', which sets condition"):
        load_source("domain", src(path=p, condition="GPT4"))


def test_domain_text_then_dmt_a_raw_text_stage_trains_every_token(tmp_path):
    """Continued pretraining on domain text as the first stage, then DMT on conversations (issue #15's example)."""
    from mixtune.pipeline import prepare_data
    from mixtune.recipe import Recipe

    docs = [{"text": f"Document {i}. " + "Alloys are mixtures of metals. " * (1 + 2 * (i % 5))} for i in range(12)]
    write_jsonl(tmp_path / "domain.jsonl", docs)
    recipe = validate(Recipe, {
        "model": "builtin:tiny", "format": {"seq_len": 128},
        "sources": {"domain": {"path": "domain.jsonl"}, "math": {"builtin": "math", "n": 20},
                    "code": {"builtin": "code", "n": 20}},
        "prefix": [{"name": "domain-text", "mixture": {"sources": {"domain": {}}}, "steps": 2}],
        "strategy": {"name": "dmt", "k": 0.25, "general": "code"}})
    data = prepare_data(recipe, tmp_path)
    first = data.stages[0]
    assert first.config.name == "domain-text" and len(data.stages) == 3
    real = first.packed.example_ids >= 0
    starts = real & (first.packed.position_ids == 0)
    # every real token is trained except the first of each piece; long documents fill several rows
    assert bool(((first.packed.labels != IGNORE) == (real & ~starts)).all())
    assert int(starts.sum()) > len(docs)
    tokens = sum(len(ex.input_ids) for ex in first.examples)
    assert first.packed.n_tokens == tokens  # nothing dropped or truncated
    later = data.stages[1].packed
    assert bool(((later.labels != IGNORE) & (later.example_ids >= 0)).any())  # the conversations train as before


def test_preference_pairs_in_trl_shapes_become_the_chosen_conversation_and_the_rejected_reply(tmp_path):
    p = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},  # standard
        {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "3+3?"}],  # conversational
         "chosen": [{"role": "assistant", "content": "6"}],
         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "7"}]}]},
    ])
    recs = load_source("prefs", src(path=p))
    assert recs[0] == {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                       "rejected": "5", "ability": "prefs"}
    assert recs[1]["messages"] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "3+3?"},
                                   {"role": "assistant", "content": "6"}]
    assert recs[1]["rejected"] == "7"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": [
        {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}]}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: \"rejected\" must be a string or a list holding one assistant"):
        load_source("bad", src(path=bad))
