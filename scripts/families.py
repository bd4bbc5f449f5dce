"""The registry of model families, read from ``templates/families/``.

A family is named by its prompt format and is two files: ``<name>.json`` (which Hugging Face architectures
and model types it covers, the markers its chat template must contain, its stop tokens) and
``<name>.inference_model.json.j2`` (its Foundry ``inference_model.json``). Adding a family is adding
those files; no code changes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import settings
from .errors import TemplateError
from .schema import Field, Obj, validate

FAMILIES_DIR = settings.TEMPLATES_DIR / "families"
TEMPLATE_SUFFIX = ".inference_model.json.j2"

_FAMILY_SCHEMA = Obj({
    "description": Field(str, required=True),
    "architectures": Field(list, required=True, item_type=str),
    "model_types": Field(list, required=True, item_type=str),
    "template_markers": Field(list, default=[], item_type=str),
    "stop_tokens": Field(list, default=[], item_type=str),
})


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    template_markers: tuple[str, ...]
    stop_tokens: tuple[str, ...]

    @property
    def template_name(self) -> str:
        """Jinja template path relative to the templates folder."""
        return f"families/{self.name}{TEMPLATE_SUFFIX}"


@lru_cache(maxsize=None)
def registry(folder: Path = FAMILIES_DIR) -> dict[str, Family]:
    """Every family defined in ``folder``, by name. Refuses duplicate architecture claims."""
    families: dict[str, Family] = {}
    owners: dict[str, str] = {}
    for data_file in sorted(folder.glob("*.json")):
        name = data_file.stem
        doc, problems = validate(json.loads(data_file.read_text(encoding="utf-8")), _FAMILY_SCHEMA)
        if problems:
            raise TemplateError(f"{data_file}: " + "; ".join(f"{p.path}: {p.problem}" for p in problems))
        if not (folder / f"{name}{TEMPLATE_SUFFIX}").is_file():
            raise TemplateError(f"{data_file}: family {name!r} has no template {name}{TEMPLATE_SUFFIX} beside it.")
        family = Family(name, doc["description"], tuple(doc["architectures"]), tuple(doc["model_types"]),
                        tuple(doc["template_markers"]), tuple(doc["stop_tokens"]))
        for claim in family.architectures + family.model_types:
            if claim in owners:
                raise TemplateError(f"{data_file}: {claim!r} is already claimed by family {owners[claim]!r}; "
                                    "each architecture and model type belongs to one family.")
            owners[claim] = name
        families[name] = family
    return families


def family_names() -> tuple[str, ...]:
    return tuple(registry())


def get_family(name: str) -> Family:
    try:
        return registry()[name]
    except KeyError:
        raise TemplateError(f"Unknown family {name!r}; known families: {', '.join(family_names())}.") from None


def detect_family(model_config: dict[str, Any], chat_template: str | None, where: str) -> Family:
    """Pick the family of a Hugging Face model from its ``config.json`` (architectures, then model_type),
    confirmed against the markers its tokenizer's chat template must contain."""
    architectures = model_config.get("architectures") or []
    model_type = model_config.get("model_type")
    found = None
    for family in registry().values():
        if (architectures and architectures[0] in family.architectures) or model_type in family.model_types:
            found = family
            break
    if found is None:
        known = "; ".join(f"{f.name} ({', '.join(f.architectures)})" for f in registry().values())
        raise TemplateError(
            f"{where}: no registered family covers architectures={architectures} model_type={model_type!r}. "
            f"Known families: {known}. "
            "Set model.family in the recipe (or --family) if the model uses one of these prompt formats.")
    confirm_template(found, chat_template, where)
    return found


def confirm_template(family: Family, chat_template: str | None, where: str) -> None:
    """Fail when the tokenizer's chat template lacks the family's markers (a wrong family would garble prompts)."""
    if chat_template is None:
        raise TemplateError(f"{where}: the tokenizer has no chat template (tokenizer_config.json 'chat_template' "
                            "or chat_template.jinja). Foundry Local applies the tokenizer's template: add one, e.g. "
                            "tokenizer.chat_template = ...; tokenizer.save_pretrained(folder).")
    missing = [m for m in family.template_markers if m not in chat_template]
    if missing:
        raise TemplateError(f"{where}: family {family.name!r} expects {missing} in the tokenizer's chat template, "
                            "which does not contain them. Check model.family in the recipe.")
