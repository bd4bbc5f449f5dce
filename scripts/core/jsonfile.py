"""Reading hand-edited JSON files strictly: a size limit before reading, duplicate keys refused with their key path
(Python's ``json`` keeps the last of two equal keys silently), and syntax errors with line and column."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Type

from scripts.core.errors import RecipeError, SlmopsError

#: Largest recipe (or other hand-edited JSON) file read; real recipes are a few kilobytes.
MAX_FILE_BYTES = 1 << 20
#: Longest free-text value (descriptions, system prompts) taken from such a file.
MAX_TEXT_CHARS = 4096


class _Pairs(dict):
    """A JSON object that remembers the keys it saw twice."""

    duplicates: list[str]


def _pairs(pairs: list[tuple[str, Any]]) -> _Pairs:
    obj = _Pairs()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _find_duplicates(value: Any, path: str = "") -> list[str]:
    found = []
    if isinstance(value, dict):
        found += [f"{path}.{k}" if path else k for k in getattr(value, "duplicates", [])]
        for key, sub in value.items():
            found += _find_duplicates(sub, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            found += _find_duplicates(sub, f"{path}[{i}]")
    return found


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def read_json_strict(path: Path, what: str = "recipe", error: Type[SlmopsError] = RecipeError,
                     max_bytes: int = MAX_FILE_BYTES) -> Any:
    """Parse the JSON file ``path``; raise ``error`` naming the file (and the key path, line or limit) when it is
    too large, unreadable, not UTF-8, not JSON, or holds a key twice in one object."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: the {what} file is {size:,} bytes; the limit is {max_bytes:,}. A {what} holds "
                        "settings, not data: point to large files by path instead of pasting them in.")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: the {what} file is not UTF-8 text ({exc.reason} at byte {exc.start}). Save it as "
                    "UTF-8.") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} file: {exc.strerror or exc}.") from None
    try:
        doc = json.loads(text, object_pairs_hook=_pairs)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}. Fix the syntax "
                    "(a trailing comma or a missing quote is the usual cause).") from None
    duplicates = _find_duplicates(doc)
    if duplicates:
        raise error(f"{path}: the key {duplicates[0]} appears twice in the same object"
                    + (f" (also: {', '.join(duplicates[1:])})" if len(duplicates) > 1 else "")
                    + "; JSON readers keep only the last one silently. Keep one of them.")
    return _plain(doc)


def text_limit(value: str, limit: int = MAX_TEXT_CHARS) -> str | None:
    """A schema ``Field.check`` for free text: None when short enough, else the problem."""
    return None if len(value) <= limit else (f"{len(value):,} characters; the limit is {limit:,} (free text is "
                                             "copied into the installed model's files)")
