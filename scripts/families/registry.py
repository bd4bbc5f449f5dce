"""The registry of model families, read from ``templates/families/``.

A family is named by its prompt format and is two files: ``<name>.json`` (which Hugging Face architectures
and model types it covers, the markers its chat template must contain, its stop tokens) and
``<name>.inference_model.json.j2`` (its Foundry ``inference_model.json``). Adding a family is adding
those files; no code changes.
"""
from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from scripts.core import settings
from scripts.core.errors import TemplateError
from scripts.core.schema import Field, Obj, validate

FAMILIES_DIR = settings.TEMPLATES_DIR / "families"
TEMPLATE_SUFFIX = ".inference_model.json.j2"
CHAT_TEMPLATE_SUFFIX = ".chat_template.jinja"
#: How a family's tokenizer chat template treats a system message: ``native`` (its own turn, so PromptTemplate
#: ``system`` + ``prompt`` renders the same), ``folded`` (merged into the first user turn, as Gemma does; no
#: PromptTemplate can express that) or ``unsupported`` (the template raises, as Mistral-7B-Instruct-v0.1 does).
SYSTEM_ROLES = ("native", "folded", "unsupported")
#: ``--family auto-template``: derive PromptTemplate from the tokenizer's own chat template.
AUTO_TEMPLATE = "auto-template"

_FAMILY_SCHEMA = Obj({
    "description": Field(str, required=True),
    "architectures": Field(list, required=True, item_type=str),
    "model_types": Field(list, required=True, item_type=str),
    "template_markers": Field(list, default=[], item_type=str),
    "stop_tokens": Field(list, default=[], item_type=str),
    "special_tokens": Field(list, default=[], item_type=str),
    "bos_token": Field(str, default=None),
    "system_role": Field(str, default="native", choices=SYSTEM_ROLES),
    "generation": Field(dict, default={}),
    # architectures this family covers whose conversion fails in the pinned toolchain: {architecture: reason}
    "unconvertible": Field(dict, default={}),
})


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    template_markers: tuple[str, ...]
    stop_tokens: tuple[str, ...]
    special_tokens: tuple[str, ...] = ()
    bos_token: str | None = None  # emitted once by the chat template before the first turn; not in PromptTemplate
    system_role: str = "native"
    generation: tuple[tuple[str, Any], ...] = ()  # family generation defaults (a recipe's own values win)
    folder: Path = FAMILIES_DIR
    unconvertible: tuple[tuple[str, str], ...] = ()

    @property
    def template_name(self) -> str:
        """Jinja template path relative to the templates folder."""
        return f"families/{self.name}{TEMPLATE_SUFFIX}"

    @property
    def generation_defaults(self) -> dict[str, Any]:
        return dict(self.generation)

    @property
    def reference_chat_template(self) -> str | None:
        """The family's tokenizer chat template as the real models ship it (``<name>.chat_template.jinja``), used to
        build the tiny test models and the golden files; None when the family has none."""
        path = self.folder / f"{self.name}{CHAT_TEMPLATE_SUFFIX}"
        return path.read_text(encoding="utf-8") if path.is_file() else None


TOOLS_SUFFIX = ".tools.json"


@lru_cache(maxsize=None)
def registry(folder: Path = FAMILIES_DIR) -> dict[str, Family]:
    """Every family defined in ``folder``, by name. Refuses duplicate architecture claims."""
    families: dict[str, Family] = {}
    owners: dict[str, list[str]] = {}
    for data_file in sorted(folder.glob("*.json")):
        if data_file.name.endswith(TOOLS_SUFFIX):  # a family's tool format (scripts.families.tools), not a family
            continue
        name = data_file.stem
        try:
            raw = json.loads(data_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise TemplateError(f"{data_file}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}. "
                                "Fix the family file.") from exc
        doc, problems = validate(raw, _FAMILY_SCHEMA)
        if problems:
            raise TemplateError(f"{data_file}: " + "; ".join(f"{p.path}: {p.problem}" for p in problems))
        if not (folder / f"{name}{TEMPLATE_SUFFIX}").is_file():
            raise TemplateError(f"{data_file}: family {name!r} has no template {name}{TEMPLATE_SUFFIX} beside it.")
        family = Family(name, doc["description"], tuple(doc["architectures"]), tuple(doc["model_types"]),
                        tuple(doc["template_markers"]), tuple(doc["stop_tokens"]), tuple(doc["special_tokens"]),
                        doc["bos_token"], doc["system_role"], tuple(sorted(doc["generation"].items())), folder,
                        tuple(sorted(doc["unconvertible"].items())))
        # Several families may share an architecture (DeepSeek-R1 distills are Qwen2 or Llama models), as long as
        # their chat-template markers tell them apart: detection then chooses by the tokenizer's template.
        for claim in family.architectures + family.model_types:
            for other in owners.get(claim, []):
                if set(family.template_markers) == set(families[other].template_markers):
                    raise TemplateError(f"{data_file}: {claim!r} is already claimed by family {other!r} and the "
                                        "template markers do not tell the two apart; give each family a marker "
                                        "the other's chat template lacks.")
            owners.setdefault(claim, []).append(name)
        families[name] = family
    return families


def unconvertible_reason(architecture: str) -> str | None:
    """Why the pinned toolchain cannot convert ``architecture`` (from the families' ``unconvertible``), or None."""
    for family in registry().values():
        reason = dict(family.unconvertible).get(architecture)
        if reason:
            return reason
    return None


@lru_cache(maxsize=1)
def builder_architectures() -> tuple[str, ...]:
    """The ``architectures[0]`` values the pinned ONNX Runtime GenAI model builder (what Olive's ModelBuilder pass runs)
    converts, read from its source without importing it; empty when it cannot be found (then nothing is refused)."""
    spec = importlib.util.find_spec("onnxruntime_genai")
    builder = Path(spec.origin).parent / "models" / "builder.py" if spec and spec.origin else None
    if builder is None or not builder.is_file():
        return ()
    return tuple(sorted(set(re.findall(r'architectures\[0\]\s*==\s*"(\w+)"', builder.read_text(encoding="utf-8")))))


def unsupported_architecture(model_config: dict[str, Any]) -> str | None:
    """Why a model of this ``config.json`` cannot be deployed at all, before anything is converted: its
    ``architectures[0]`` is missing, or neither a registered family covers it nor the pinned builder converts it
    (a builder-convertible architecture without a family can still go through ``--family auto-template``)."""
    architectures = model_config.get("architectures") or []
    if not architectures:
        return ("config.json names no architecture; the converter needs one (e.g. \"architectures\": "
                "[\"LlamaForCausalLM\"], as model.save_pretrained writes it)")
    arch = architectures[0]
    convertible = builder_architectures()
    if any(arch in f.architectures for f in registry().values()) or not convertible or arch in convertible:
        return None
    families = "; ".join(f"{f.name} ({', '.join(f.architectures)})" for f in registry().values())
    return (f"architecture {arch!r} (config.json architectures[0], model_type {model_config.get('model_type')!r}) is "
            f"not supported: no registered family covers it (families: {families}) and the pinned converter, the "
            f"ONNX Runtime GenAI model builder behind Olive's ModelBuilder pass, cannot build it (it builds "
            f"{', '.join(convertible)}). Nothing was converted; deploy a model of one of these architectures")


def family_names() -> tuple[str, ...]:
    return tuple(registry())


def get_family(name: str) -> Family:
    try:
        return registry()[name]
    except KeyError:
        raise TemplateError(f"Unknown family {name!r}; known families: {', '.join(family_names())}.") from None


def candidates(model_config: dict[str, Any]) -> list[Family]:
    """Families that claim the model's ``architectures[0]``; failing that, its ``model_type``."""
    architectures = model_config.get("architectures") or []
    model_type = model_config.get("model_type")
    by_arch = [f for f in registry().values() if architectures and architectures[0] in f.architectures]
    return by_arch or [f for f in registry().values() if model_type and model_type in f.model_types]


def by_markers(chat_template: str, families: list[Family] | None = None) -> list[Family]:
    """Families (of ``families``, else every registered family that has markers) whose every marker is in
    ``chat_template``."""
    pool = [f for f in registry().values() if f.template_markers] if families is None else families
    return [f for f in pool if all(m in chat_template for m in f.template_markers)]


def detect_family(model_config: dict[str, Any], chat_template: str | None, where: str) -> Family:
    """Pick the family of a Hugging Face model. Families are prompt formats, so the tokenizer's chat template
    decides, and ``config.json`` narrows the choice:

    1. the families claiming ``architectures[0]`` (then ``model_type``) whose markers are all in the template; the
       most markers present wins (Phi-4's ``<|im_sep|>`` over plain ChatML);
    2. else any family whose markers are all in the template (SmolLM2 is a ``LlamaForCausalLM`` that speaks ChatML);
    3. a tokenizer without a chat template: the one family claiming the architecture (its template is shipped).

    Nothing fitting is a :class:`TemplateError` naming what was found, every family and how to override."""
    architectures = model_config.get("architectures") or []
    model_type = model_config.get("model_type")
    found = candidates(model_config)
    if chat_template is None:
        if len(found) == 1:
            return found[0]
        confirm_template(found[0] if found else next(iter(registry().values())), None, where)  # raises
    matching = by_markers(chat_template, found) or by_markers(chat_template)
    if matching:
        return max(matching, key=lambda f: len(f.template_markers))
    if not found:
        known = "; ".join(f"{f.name} ({', '.join(f.architectures)})" for f in registry().values())
        raise TemplateError(
            f"{where}: no registered family covers architectures={architectures} model_type={model_type!r}, and the "
            f"tokenizer's chat template has no registered family's markers. Known families: {known}. "
            "Set model.family in the recipe (or --family) if the model uses one of these prompt formats, or use "
            f"--family {AUTO_TEMPLATE} to derive PromptTemplate from the tokenizer's own chat template.")
    if len(found) == 1:
        confirm_template(found[0], chat_template, where)  # raises, naming the missing markers
    tried = "; ".join(f"{f.name} expects {list(f.template_markers)}" for f in found)
    raise TemplateError(f"{where}: {architectures[:1] or model_type} is used by families "
                        f"{', '.join(f.name for f in found)}, but the tokenizer's chat template has the markers "
                        f"of none of them ({tried}), nor of any other family. Set model.family (or --family), or use "
                        f"--family {AUTO_TEMPLATE}.")


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
