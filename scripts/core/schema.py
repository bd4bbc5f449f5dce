"""A tiny declarative validator for JSON documents (recipes, family files).

Why not pydantic: we want messages shaped for users editing a JSON file by hand:
``recipes/qwen.json: conversion.quantization.blok_size: unknown key; valid keys: ... (did you mean 'block_size'?)``.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "an object"}


@dataclass(frozen=True)
class Field:
    """One key of an object: its type, default, allowed values and an optional extra check."""

    type: type | tuple[type, ...]
    default: Any = None
    required: bool = False
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns a problem description or None
    item_type: type | None = None  # for lists
    help: str = ""


@dataclass(frozen=True)
class Obj:
    """A nested object with a fixed set of keys."""

    fields: Mapping[str, "Field | Obj"]
    required: bool = False
    help: str = ""


@dataclass
class SchemaViolation:
    path: str
    problem: str


def _type_ok(value: Any, expected: type | tuple[type, ...]) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true must not pass as an int
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, types)


def _type_name(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def validate(doc: Any, schema: Obj, path: str = "") -> tuple[dict[str, Any], list[SchemaViolation]]:
    """Check ``doc`` against ``schema``; return the document with defaults filled in and every violation found."""
    problems: list[SchemaViolation] = []
    where = path or "(top level)"
    if not isinstance(doc, dict):
        return {}, [SchemaViolation(where, f"expected an object, found {type(doc).__name__}")]
    valid = list(schema.fields)
    for key in doc:
        if key not in schema.fields:
            problems.append(SchemaViolation(_join(path, key),
                                            f"unknown key; valid keys: {', '.join(valid)}{_suggest(key, valid)}"))
    out: dict[str, Any] = {}
    for key, spec in schema.fields.items():
        sub = _join(path, key)
        if key not in doc:
            if spec.required:
                problems.append(SchemaViolation(sub, "missing required key" + (f" ({spec.help})" if spec.help else "")))
                continue
            if isinstance(spec, Obj):
                out[key], sub_problems = validate({}, spec, sub)
                problems += sub_problems
            else:
                out[key] = spec.default
            continue
        value = doc[key]
        if isinstance(spec, Obj):
            out[key], sub_problems = validate(value, spec, sub)
            problems += sub_problems
            continue
        if value is None and not spec.required:
            out[key] = spec.default
            continue
        if not _type_ok(value, spec.type):
            problems.append(SchemaViolation(sub, f"expected {_type_name(spec.type)}, found {value!r}"))
            continue
        if spec.item_type is not None and any(not _type_ok(v, spec.item_type) for v in value):
            problems.append(SchemaViolation(sub, f"every item must be {_type_name(spec.item_type)}"))
            continue
        if spec.choices is not None and value not in spec.choices:
            choices = ", ".join(repr(c) if isinstance(c, str) else str(c) for c in spec.choices)
            problems.append(SchemaViolation(sub, f"{value!r} is not allowed; choose one of: {choices}"))
            continue
        if spec.check is not None and (problem := spec.check(value)):
            problems.append(SchemaViolation(sub, problem))
            continue
        out[key] = float(value) if spec.type is float else value
    return out, problems


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def in_range(low: float, high: float) -> Callable[[Any], str | None]:
    """A ``Field.check`` that accepts numbers in ``[low, high]``."""

    def check(value: Any) -> str | None:
        return None if low <= value <= high else f"{value} is out of range; allowed: {low} to {high}"

    check.bounds = (low, high)  # type: ignore[attr-defined]  # read by the generated docs (docs/recipe.md)
    return check


def defaults_from(obj: Obj):
    """Class decorator, applied under ``@dataclass``: every annotated field of the class that ``obj`` declares as a
    :class:`Field` gets that field's default, so a key's default is written once (in the schema) and the spec
    dataclass built from validated data restates only names and types. A field the class already defaults is left
    alone; an annotated name the schema does not declare is an error (the two would drift)."""

    def apply(cls):
        for name in cls.__dict__.get("__annotations__", {}):
            spec = obj.fields.get(name)
            if spec is None:
                raise TypeError(f"{cls.__name__}.{name} is not a key of its schema section")
            if isinstance(spec, Field) and name not in cls.__dict__:
                setattr(cls, name, spec.default)
        return cls

    return apply
