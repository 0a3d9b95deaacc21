from typing import Annotated, ClassVar, Literal, Union

import pytest
from pydantic import Field, field_validator

from mixtune.core import ConfigError, Strict, load_config, parse_overrides


class Inner(Strict):
    rate: float = Field(default=0.5, gt=0, le=1)
    """a rate"""


class Outer(Strict):
    name: str
    mode: Literal["a", "b"] = "a"
    inner: Inner = Inner()


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_valid_file_with_defaults(tmp_path):
    cfg = load_config(Outer, write(tmp_path, "name: x\n"))
    assert cfg == Outer(name="x", mode="a", inner=Inner(rate=0.5))


def test_every_problem_reported_with_its_line(tmp_path):
    p = write(tmp_path, "name: x\nmode: c\ninner:\n  rate: 1.5\n  colour: red\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, p)
    msg = str(e.value)
    assert "3 problems" in msg
    assert f"{p}:2 mode = 'c'" in msg
    assert f"{p}:4 inner.rate = 1.5" in msg and "less than or equal to 1" in msg
    assert f"{p}:5 inner.colour = 'red': unknown key" in msg


def test_missing_key_points_at_parent(tmp_path):
    p = write(tmp_path, "mode: a\n")
    with pytest.raises(ConfigError, match=r"run.yaml:1 name: Field required"):
        load_config(Outer, p)


def test_overrides_apply_and_are_blamed_as_overrides(tmp_path):
    p = write(tmp_path, "name: x\n")
    cfg = load_config(Outer, p, parse_overrides(["inner.rate=0.25", "mode=b"]))
    assert cfg.inner.rate == 0.25 and cfg.mode == "b"
    with pytest.raises(ConfigError) as e:
        load_config(Outer, p, parse_overrides(["inner.rate=7"]))
    # the key is named once (it used to read "override inner.rate inner.rate = 7")
    assert "\n  override inner.rate = 7: Input should be less than or equal to 1" in str(e.value)


class Listy(Strict):
    items: list[Inner]


def test_overrides_index_lists_and_name_bad_indices(tmp_path):
    p = write(tmp_path, "items:\n  - rate: 0.1\n  - rate: 0.2\n")
    cfg = load_config(Listy, p, parse_overrides(["items.1.rate=0.9"]))
    assert [i.rate for i in cfg.items] == [0.1, 0.9]
    with pytest.raises(ConfigError, match="items is a list of 2; expected an index 0..1, got '5'"):
        load_config(Listy, p, parse_overrides(["items.5.rate=0.9"]))


def test_error_from_a_new_key_set_by_override_is_blamed_on_the_override(tmp_path):
    p = write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError, match=r"override colour = \{'shade': 'red'\}: unknown key"):
        load_config(Outer, p, parse_overrides(["colour.shade=red"]))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["seed"])


def test_yaml_syntax_error_names_line(tmp_path):
    p = write(tmp_path, "name: x\ninner: [1, 2\n")
    with pytest.raises(ConfigError, match=r"run.yaml:\d+: not valid YAML"):
        load_config(Outer, p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_configs_are_frozen(tmp_path):
    cfg = load_config(Outer, write(tmp_path, "name: x\n"))
    with pytest.raises(Exception):
        cfg.name = "y"  # type: ignore[misc]


def test_field_docs_come_from_attribute_docstrings():
    assert Inner.model_fields["rate"].description == "a rate"


class Documented(Strict):
    DOCS: ClassVar[str] = "docs/somewhere.md"
    name: str = "x"
    inner: Inner = Inner()
    items: list[Inner] = []


def test_unknown_key_suggests_close_matches_lists_keys_and_points_to_the_docs(tmp_path):
    p = write(tmp_path, "nmae: x\ninner:\n  rat: 0.2\nitems:\n  - {rate: 0.1, rte: 2}\n")
    with pytest.raises(ConfigError) as e:
        load_config(Documented, p)
    msg = str(e.value)
    assert f"{p}:1 nmae = 'x': unknown key; did you mean 'name'? (keys here: inner, items, name); " \
           "every key is described in docs/somewhere.md" in msg
    assert f"{p}:3 inner.rat = 0.2: unknown key; did you mean 'rate'? (keys here: rate)" in msg
    assert f"{p}:5 items.0.rte = 2: unknown key; did you mean 'rate'?" in msg
    assert "mixtune --help" not in msg


class Located(Strict):
    path: str

    @field_validator("path")
    @classmethod
    def _exists(cls, v, info):
        if info.context and v not in info.context["files"]:
            raise ValueError("no such file")
        return v


def test_context_reaches_validators_and_their_problems_are_listed_with_lines(tmp_path):
    p = write(tmp_path, "path: a.txt\n")
    assert load_config(Located, p, context={"files": ["a.txt"]}).path == "a.txt"
    with pytest.raises(ConfigError) as e:
        load_config(Located, p, context={"files": []})
    assert str(e.value) == f"{p}: 1 problem in the config:\n  {p}:1 path = 'a.txt': no such file"


def test_non_utf8_config_names_the_line(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_bytes(b"name: x\nmode: \xff\n")
    with pytest.raises(ConfigError, match=r"run.yaml:2: not UTF-8 text \(byte 0xff\)"):
        load_config(Outer, p)


class Cat(Strict):
    kind: Literal["cat"] = "cat"
    purr: int = 1


class Dog(Strict):
    kind: Literal["dog"] = "dog"
    bark: int = 1


class Pets(Strict):
    pets: dict[str, Annotated[Union[Cat, Dog], Field(discriminator="kind")]] = {}


def test_errors_inside_a_tagged_union_read_as_the_file_writes_them(tmp_path):
    p = write(tmp_path, "pets:\n  rex:\n    kind: dog\n    brak: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(Pets, p)
    # no union tag in the path ("pets.rex.dog.brak"), and the keys of the dog alone
    assert f"{p}:4 pets.rex.brak = 2: unknown key; did you mean 'bark'? (keys here: bark, kind)" in str(e.value)
