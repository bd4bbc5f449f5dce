"""Tests for scripts/recipe/keys_doc.py: docs/recipe.md is generated from the schema and up to date."""
from __future__ import annotations

from scripts.core.schema import Field, Obj, in_range
from scripts.recipe.keys_doc import PAGE, markdown, rows


def test_the_page_is_up_to_date():
    assert PAGE.read_text(encoding="utf-8") == markdown(), "docs/recipe.md is stale: run `invoke docs`"


def test_every_key_of_the_schema_has_a_row_and_a_meaning():
    page = markdown()
    for path, spec in rows():
        assert f"| `{path}` |" in page
        assert spec.help, f"{path} has no help= in the schema (scripts/recipe/spec.py): the page would say nothing"


def test_a_row_shows_type_default_choices_and_range():
    schema = Obj({"a": Obj({"n": Field(int, default=3, check=in_range(1, 8), help="x | y <z>"),
                            "s": Field(str, required=True, choices=("p", "q"), help="s")})})
    page = markdown(schema)
    assert "| `a.n` | integer | `3` | 1 to 8 | x \\| y &lt;z&gt; |" in page
    assert "| `a.s` | string | required | `\"p\"`, `\"q\"` | s |" in page
