"""Tests for scripts/core/schema.py: the declarative validator behind recipe and family files."""
from __future__ import annotations

import pytest

from scripts.core.schema import Field, Obj, in_range, validate

SCHEMA = Obj({
    "name": Field(str, required=True, help="what to call it"),
    "count": Field(int, default=3),
    "ratio": Field(float, default=0.5, check=in_range(0.0, 1.0)),
    "flag": Field(bool, default=False),
    "mode": Field(str, default="fast", choices=("fast", "slow")),
    "size": Field(int, default=32, choices=(16, 32, 64)),
    "tags": Field(list, default=[], item_type=str),
    "inner": Obj({
        "block_size": Field(int, default=32),
        "symmetric": Field(bool, default=True),
    }),
})


def problems_by_path(doc) -> dict[str, str]:
    _, problems = validate(doc, SCHEMA)
    return {p.path: p.problem for p in problems}


def test_valid_document_gets_defaults_filled_in():
    data, problems = validate({"name": "x", "inner": {"block_size": 64}}, SCHEMA)
    assert problems == []
    assert data == {"name": "x", "count": 3, "ratio": 0.5, "flag": False, "mode": "fast", "size": 32, "tags": [],
                    "inner": {"block_size": 64, "symmetric": True}}


def test_missing_nested_object_is_filled_with_its_defaults():
    data, problems = validate({"name": "x"}, SCHEMA)
    assert problems == []
    assert data["inner"] == {"block_size": 32, "symmetric": True}


def test_unknown_nested_key_names_full_path_valid_keys_and_suggestion():
    found = problems_by_path({"name": "x", "inner": {"blok_size": 64}})
    assert list(found) == ["inner.blok_size"]
    assert "unknown key" in found["inner.blok_size"]
    assert "valid keys: block_size, symmetric" in found["inner.blok_size"]
    assert "(did you mean 'block_size'?)" in found["inner.blok_size"]


def test_unknown_key_without_close_match_has_no_suggestion():
    found = problems_by_path({"name": "x", "zzzzzz": 1})
    assert "unknown key" in found["zzzzzz"]
    assert "did you mean" not in found["zzzzzz"]


def test_missing_required_key_includes_help():
    found = problems_by_path({})
    assert found == {"name": "missing required key (what to call it)"}


@pytest.mark.parametrize("key, value, expected", [
    ("count", "3", "expected an integer, found '3'"),
    ("count", 2.5, "expected an integer, found 2.5"),
    ("count", True, "expected an integer, found True"),  # JSON true is not an int
    ("flag", 1, "expected true or false, found 1"),
    ("ratio", "0.1", "expected a number, found '0.1'"),
    ("tags", "a", "expected a list, found 'a'"),
    ("name", 5, "expected a string, found 5"),
])
def test_wrong_type(key, value, expected):
    doc = {"name": "x", key: value}
    assert problems_by_path(doc)[key] == expected


def test_int_is_accepted_for_float_and_converted():
    data, problems = validate({"name": "x", "ratio": 1}, SCHEMA)
    assert problems == []
    assert data["ratio"] == 1.0 and isinstance(data["ratio"], float)


def test_value_not_in_choices_lists_the_choices():
    found = problems_by_path({"name": "x", "mode": "medium", "size": 48})
    assert found["mode"] == "'medium' is not allowed; choose one of: 'fast', 'slow'"
    assert found["size"] == "48 is not allowed; choose one of: 16, 32, 64"


def test_list_item_type_checked():
    assert problems_by_path({"name": "x", "tags": ["a", 2]})["tags"] == "every item must be a string"


def test_range_check():
    assert problems_by_path({"name": "x", "ratio": 1.5})["ratio"] == "1.5 is out of range; allowed: 0.0 to 1.0"
    assert in_range(0, 10)(10) is None
    assert in_range(0, 10)(-1) is not None


def test_null_optional_value_takes_the_default():
    data, problems = validate({"name": "x", "count": None}, SCHEMA)
    assert problems == [] and data["count"] == 3


def test_non_object_where_object_expected():
    _, problems = validate([1, 2], SCHEMA)
    assert [(p.path, p.problem) for p in problems] == [("(top level)", "expected an object, found list")]
    found = problems_by_path({"name": "x", "inner": 7})
    assert found == {"inner": "expected an object, found int"}


def test_all_problems_are_reported_at_once():
    found = problems_by_path({"count": "many", "mode": "x", "inner": {"blok_size": 1, "symmetric": "yes"}, "extra": 1})
    assert set(found) == {"name", "count", "mode", "inner.blok_size", "inner.symmetric", "extra"}
