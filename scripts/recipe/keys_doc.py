"""``docs/recipe.md``: every recipe key with its type, default, allowed values and meaning, generated from the one
declaration of the recipe keys (:data:`scripts.recipe.spec.SCHEMA`), so the page and the validator cannot drift.

Regenerate with ``invoke docs``; ``tests/recipe/test_keys_doc.py`` fails when the page is out of date."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from scripts.core.schema import Field, Obj
from scripts.core.settings import REPO_ROOT
from scripts.recipe.spec import SCHEMA

PAGE = REPO_ROOT / "docs" / "recipe.md"

_TYPES = {str: "string", int: "integer", float: "number", bool: "true/false", list: "list", dict: "object"}

_INTRO = """\
<!-- Generated from the recipe schema (scripts/recipe/spec.py SCHEMA) by `invoke docs`; do not edit by hand. -->
# Recipe keys

A recipe is one JSON file in `recipes/` (or any path given to `--model`). Every key is validated when the recipe is
loaded: an unknown or misspelt key, a wrong type, or a value outside its choices or range is an error naming the
file, the key path and what is allowed. Relative paths are relative to the recipe file. Start from
`recipes/qwen.json` (the demo) or the recipe of your model's family (`recipes/<family>.json`).

The tutorial's `"conversion": {"config": {"precision": …, "quantization_config": …}}` form and a whole Olive
workflow file are also accepted and translated into these keys, with a note per key
([quantization.md](quantization.md#the-tutorials-forms)).
"""


def _type(spec: Field) -> str:
    types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
    text = " or ".join(_TYPES.get(t, t.__name__) for t in types)
    return f"list of {_TYPES.get(spec.item_type, 'values')}" if spec.item_type else text


def _value(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "`true`" if v else "`false`"
    if isinstance(v, (list, tuple)):
        return "`[]`" if not v else "`[" + ", ".join(f'"{x}"' if isinstance(x, str) else str(x) for x in v) + "]`"
    if isinstance(v, str):
        return f'`"{v}"`' if v else '`""`'
    return f"`{v:g}`" if isinstance(v, float) else f"`{v}`"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _allowed(spec: Field) -> str:
    if spec.choices is not None:
        return ", ".join(_value(c) for c in spec.choices)
    bounds = getattr(spec.check, "bounds", None)
    if bounds:
        return f"{_number(bounds[0])} to {_number(bounds[1])}"
    return ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def rows(schema: Obj = SCHEMA, prefix: str = "") -> Iterator[tuple[str, Field]]:
    """``(dotted key, Field)`` for every leaf key, in declaration order."""
    for key, spec in schema.fields.items():
        path = f"{prefix}{key}"
        if isinstance(spec, Obj):
            yield from rows(spec, path + ".")
        else:
            yield path, spec


def markdown(schema: Obj = SCHEMA) -> str:
    """The whole page: one table per top-level section."""
    out = [_INTRO]
    sections: dict[str, list[tuple[str, Field]]] = {}
    for path, spec in rows(schema):
        sections.setdefault(path.split(".")[0] if "." in path else "(top level)", []).append((path, spec))
    for section, items in sections.items():
        obj = schema.fields.get(section)
        required = " (required)" if isinstance(obj, Obj) and obj.required else ""
        out.append(f"## `{section}`{required}\n" if section != "(top level)" else "## Top level\n")
        out.append("| key | type | default | allowed | meaning |\n|---|---|---|---|---|")
        for path, spec in items:
            default = "required" if spec.required else _value(spec.default)
            out.append(f"| `{path}` | {_type(spec)} | {default} | {_cell(_allowed(spec))} | {_cell(spec.help)} |")
        out.append("")
    return "\n".join(out)


def write(page: Path = PAGE) -> Path:
    """Write :func:`markdown` to ``page`` (``docs/recipe.md``); return the path."""
    page.write_text(markdown(), encoding="utf-8")
    return page


if __name__ == "__main__":  # python -m scripts.recipe.keys_doc
    print(write())
