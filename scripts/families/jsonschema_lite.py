"""The part of JSON Schema that tool parameters and ``response_format`` schemas use, checked without a dependency:
``type`` (incl. lists of types), ``properties``, ``required``, ``additionalProperties`` (bool or schema), ``enum``,
``const``, ``items``, ``minItems``/``maxItems``, ``minLength``/``maxLength``, ``pattern``, ``minimum``/``maximum``,
``anyOf``/``oneOf``/``allOf``. Other keywords (``$ref``, ``format``, …) are not checked: :func:`unchecked_keywords`
names them so a caller can say so."""
from __future__ import annotations

import re
from typing import Any

CHECKED = {"type", "properties", "required", "additionalProperties", "enum", "const", "items", "minItems", "maxItems",
           "minLength", "maxLength", "pattern", "minimum", "maximum", "anyOf", "oneOf", "allOf"}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "x-guidance", "strict", "$comment"}
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or (isinstance(value, float) and value.is_integer())
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    t = _TYPES.get(name)
    return t is not None and isinstance(value, t)


def schema_errors(value: Any, schema: Any, where: str = "$") -> list[str]:
    """Every way ``value`` breaks ``schema`` (empty when it satisfies the checked keywords)."""
    if schema is True or schema is None or schema == {}:
        return []
    if schema is False:
        return [f"{where}: no value is allowed here"]
    errs: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        if not any(_is_type(value, n) for n in names):
            return [f"{where}: expected {' or '.join(names)}, got {type(value).__name__} {value!r}"[:200]]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{where}: {value!r} is not one of {schema['enum']!r}")
    if "const" in schema and value != schema["const"]:
        errs.append(f"{where}: must be {schema['const']!r}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errs.append(f"{where}: missing required property {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, v in value.items():
            if key in props:
                errs += schema_errors(v, props[key], f"{where}.{key}")
            elif extra is False:
                errs.append(f"{where}: unexpected property {key!r}")
            elif isinstance(extra, dict):
                errs += schema_errors(v, extra, f"{where}.{key}")
    if isinstance(value, list):
        if "items" in schema:
            for i, v in enumerate(value):
                errs += schema_errors(v, schema["items"], f"{where}[{i}]")
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            errs.append(f"{where}: {len(value)} items is outside the allowed count")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            errs.append(f"{where}: length {len(value)} is outside the allowed length")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errs.append(f"{where}: {value!r} does not match {schema['pattern']!r}")
    if _is_type(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            errs.append(f"{where}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errs.append(f"{where}: {value} is above the maximum {schema['maximum']}")
    for sub in schema.get("allOf", []):
        errs += schema_errors(value, sub, where)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            passing = [s for s in schema[key] if not schema_errors(value, s, where)]
            if not passing or (key == "oneOf" and len(passing) > 1):
                errs.append(f"{where}: matches {len(passing)} of the {key} alternatives")
    return errs


def unchecked_keywords(schema: Any) -> set[str]:
    """Keywords in ``schema`` (anywhere) that :func:`schema_errors` does not check."""
    found: set[str] = set()
    if isinstance(schema, dict):
        for k, v in schema.items():
            if k not in CHECKED and k not in ANNOTATIONS:
                found.add(k)
            if k == "properties" and isinstance(v, dict):
                for sub in v.values():
                    found |= unchecked_keywords(sub)
            elif k in ("items", "additionalProperties"):
                found |= unchecked_keywords(v)
            elif k in ("anyOf", "oneOf", "allOf") and isinstance(v, list):
                for sub in v:
                    found |= unchecked_keywords(sub)
    return found
