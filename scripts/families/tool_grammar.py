"""Grammars for the runtime's constrained decoding (llguidance, as Foundry Local's ``response_format: lark_grammar``
takes it), pure: calls in a family's tool format to declared tools (``tool_choice`` required or a named function), and
one JSON value of a schema (``response_format`` json_object / json_schema)."""
from __future__ import annotations

import json

from scripts.families.tools import ToolFormat


def call_grammar(fmt: ToolFormat, schemas: dict[str, dict], parallel: bool) -> str:
    """A Lark grammar (llguidance, as Foundry Local's ``response_format: lark_grammar`` takes it) that admits only
    calls in the family's format to the tools in ``schemas``, arguments per schema: for ``tool_choice`` required
    or a named function."""
    def closed(schema: dict) -> dict:  # as OpenAI's strict mode: no argument the tool does not declare
        return schema if "additionalProperties" in schema else {**schema, "additionalProperties": False}

    options = [{"type": "object", "properties": {fmt.name_key: {"const": name}, fmt.arguments_key: closed(schema)},
                "required": [fmt.name_key, fmt.arguments_key], "additionalProperties": False}
               for name, schema in schemas.items()]
    spec = options[0] if len(options) == 1 else {"anyOf": options}
    many = parallel and fmt.parallel
    if fmt.call_body == "array":  # all of the turn's calls in one JSON array
        spec = {"type": "array", "items": spec, "minItems": 1, **({} if many else {"maxItems": 1})}
        many = False
    spec = {**spec, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}
    end = f" {_lark_string(fmt.call_end)}" if fmt.call_end else ""
    call = f"{_lark_string(fmt.call_start)} %json {json.dumps(spec)}{end}"
    more = f" ({_lark_string(fmt.call_separator)} call)*" if many else ""
    return f"start: call{more}\ncall: {call}\n"


def json_grammar(schema: dict | None) -> str:
    """A Lark grammar for one JSON value of ``schema`` (an object when None), compact whitespace: for
    ``response_format`` ``json_object`` / ``json_schema``."""
    spec = dict(schema) if schema else {"type": "object"}
    spec["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    return f"start: %json {json.dumps(spec)}\n"


def _lark_string(s: str) -> str:
    return json.dumps(s)
