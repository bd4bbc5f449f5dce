"""Which family a deployment uses, and what that family adds to the package.

- :func:`choose_family`: the recipe's ``model.family`` (or ``--family``): a registered name (confirmed against the
  tokenizer's chat template), ``auto`` (detected from ``config.json``, confirmed by the template), or
  ``auto-template`` (PromptTemplate derived from the tokenizer's own chat template).
- :func:`with_stop_tokens`: the family's stop tokens that the tokenizer knows become ``genai_config.json``
  ``model.eos_token_id`` entries, where ONNX Runtime GenAI (and so Foundry Local) reads them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from scripts.core.errors import ConversionError, RecipeError, TemplateError
from scripts.families import registry as family_registry
from scripts.families.registry import (AUTO_TEMPLATE, confirm_template, detect_family, Family, family_names,
                                       get_family, unconvertible_reason, unsupported_architecture)
from scripts.families.templates import TemplateAnalysis, analyse_model_template
from scripts.core.hf_folder import ModelFolder


@dataclass(frozen=True)
class FamilyChoice:
    family: Family
    how: str  # one line for the user: how the family was chosen
    prompt_template: dict[str, str] | None = None  # only for auto-template
    default_system: str = ""  # the system turn the tokenizer's template injects when none is given
    chat_template: str | None = None  # the template to ship when the tokenizer has none (the family's)
    carried: dict[str, str] | None = None  # PromptTemplate fields read from the tokenizer's template (default system)


def choose_family(requested: str, source: ModelFolder, where: str, tokenizer: Any = None) -> FamilyChoice:
    """The family for ``model.family`` (or ``--family``), with what the tokenizer's chat template adds to it: a
    default system turn (carried into ``PromptTemplate``), or no template at all (the family's own is shipped)."""
    if requested == AUTO_TEMPLATE:
        return _auto_template(source, where, tokenizer)
    if requested == "auto":
        family = detect_family(source.config, source.chat_template, where)
        how = f"{family.name} (detected from {source.architecture} and the tokenizer's chat template"
        if source.chat_template is not None and family.architectures and source.architecture not in family.architectures:
            how = (f"{family.name} (detected from the tokenizer's chat template: its markers "
                   f"{list(family.template_markers)}; {source.architecture} is not registered with a family")
        how += "; set model.family or --family to override)"
    else:
        family = get_family(requested)
        if source.chat_template is not None:
            confirm_template(family, source.chat_template, where)
        how = f"{family.name} (set in the recipe or by --family)"
    if source.chat_template is None:
        if not family.reference_chat_template:
            confirm_template(family, None, where)  # raises: nothing to ship
        return FamilyChoice(family, how + f"; the tokenizer has no chat template, so the {family.name} family's "
                            "template is shipped with the model", chat_template=family.reference_chat_template)
    try:
        analysis = analyse_model_template(source.path, tokenizer, source.chat_template)
    except TemplateError:  # e.g. Qwen3 rewrites earlier assistant turns: the family's own PromptTemplate is verified
        return FamilyChoice(family, how)
    if not analysis.default_system:
        return FamilyChoice(family, how)
    how += (f"; the tokenizer's template injects a default system prompt when none is given, carried into "
            f"PromptTemplate: {analysis.default_system!r}")
    carried = {k: analysis.prompt_template[k] for k in ("system", "prompt") if k == "prompt" or
               analysis.system_role == "native"}
    return FamilyChoice(family, how, default_system=analysis.default_system, carried=carried)


def _auto_template(source: ModelFolder, where: str, tokenizer: Any) -> FamilyChoice:
    if source.chat_template is None:
        raise TemplateError(f"{where}: --family {AUTO_TEMPLATE} needs the tokenizer's chat template, and the "
                            "tokenizer has none (tokenizer_config.json 'chat_template' or chat_template.jinja).")
    derived: TemplateAnalysis = analyse_model_template(source.path, tokenizer, source.chat_template)
    family = Family(AUTO_TEMPLATE, "PromptTemplate derived from the tokenizer's chat template", (), (), (),
                    derived.stop_tokens, derived.stop_tokens, derived.bos_token, derived.system_role)
    note = "" if derived.system_role == "native" else (
        f"; the tokenizer's template {'refuses' if derived.system_role == 'unsupported' else 'folds'} a system "
        "message, so only the user-only conversation is verified")
    if derived.default_system:
        note += f"; its default system prompt is carried into PromptTemplate: {derived.default_system!r}"
    return FamilyChoice(family, f"{AUTO_TEMPLATE} (PromptTemplate derived from the tokenizer's own chat template "
                                f"of {source.architecture}{note})", derived.prompt_template, derived.default_system)


def prompt_template_for(choice: FamilyChoice, rendered: dict[str, str]) -> dict[str, str]:
    """The PromptTemplate to install: the family's rendered one, with ``system`` and ``prompt`` as the tokenizer's
    template has them when it injects a default system prompt (``prompt`` starts with that turn; a template such as
    Llama 3.2's also adds a preamble to a given system message, which ``system`` then carries)."""
    return {**rendered, **(choice.carried or {})}


def refuse_unconvertible(source: ModelFolder) -> None:
    """Fail before Olive runs when the model's architecture is neither a registered family's nor one the pinned
    builder converts, or when the pinned toolchain is known not to convert it."""
    problem = unsupported_architecture(source.config)
    if problem:
        raise ConversionError(f"{source.path}: {problem}.")
    reason = unconvertible_reason(source.architecture)
    if reason:
        raise ConversionError(f"{source.path}: {source.architecture} cannot be converted with the pinned toolchain: "
                              f"{reason}. Use another architecture of the family or a newer toolchain.")


def refuse_system_prompt(family: Family, system_prompt: str | None, where: str) -> None:
    """A family whose chat template has no system turn cannot honour eval.system_prompt the same on v1 and v2."""
    if system_prompt and family.system_role != "native":
        raise TemplateError(f"{where}: eval.system_prompt is set, but family {family.name!r} "
                            f"{'refuses' if family.system_role == 'unsupported' else 'folds'} a system message in its "
                            "chat template, which PromptTemplate cannot express. Drop eval.system_prompt.")


def token_ids(tokenizer_json: Path) -> dict[str, int]:
    """Every token of a ``tokenizer.json`` (vocabulary and added tokens) by its text."""
    doc = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    ids = dict(doc.get("model", {}).get("vocab", {}) or {})
    ids.update({t["content"]: t["id"] for t in doc.get("added_tokens", [])})
    return ids


def with_stop_tokens(genai_config: dict[str, Any], stop_tokens: tuple[str, ...], tokenizer_json: Path) -> dict[str, Any]:
    """A copy of ``genai_config`` whose ``model.eos_token_id`` also holds the family's stop tokens."""
    if not tokenizer_json.is_file():
        return genai_config
    ids = token_ids(tokenizer_json)
    model = dict(genai_config.get("model", {}))
    current = model.get("eos_token_id")
    eos = [current] if isinstance(current, int) else list(current or [])
    eos += [ids[t] for t in stop_tokens if t in ids and ids[t] not in eos]
    model["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return {**genai_config, "model": model}


def override_family(recipe, family: str | None):
    """The recipe with ``model.family`` replaced by ``--family`` (validated like the recipe key)."""
    if family is None:
        return recipe
    valid = ("auto", AUTO_TEMPLATE, *family_names())
    if family not in valid:
        raise RecipeError(f"--family {family!r} is not a registered family; choose one of: {', '.join(valid)} "
                          "(`invoke families` describes them).")
    return replace(recipe, family=family)


def family_rows() -> list[dict[str, str]]:
    """One row per registered family for ``invoke families`` (multi-line cells: one architecture / token a line;
    an architecture the pinned toolchain cannot convert is marked ``✗``, see :func:`family_notes`)."""

    rows = []
    for f in family_registry.registry().values():
        broken = dict(f.unconvertible)
        rows.append({"family": f.name,
                     "architectures": "\n".join(a + (" ✗" if a in broken else "") for a in f.architectures),
                     "system message": f.system_role, "stop tokens": "\n".join(f.stop_tokens),
                     "prompt format": f.description})
    return rows


def family_notes() -> list[str]:
    """What to tell the user under the ``invoke families`` table: unconvertible architectures and how to choose."""

    notes = [f"✗ {arch}: not convertible: {reason}."
             for f in family_registry.registry().values() for arch, reason in f.unconvertible]
    return notes + [
        "system message: native = its own turn; folded = merged into the first user turn; unsupported = the "
        "template refuses it (eval.system_prompt is refused for both).",
        "Detection (model.family auto) uses config.json architectures[0], then the tokenizer's chat template markers. "
        "Override with model.family or --family NAME; --family auto-template derives PromptTemplate from the "
        "tokenizer's own template.",
        "recipes/<family>.json deploys a tiny model of each family offline: invoke deploy --model phi-3; "
        "your own model: invoke deploy --model phi-3 --model-path DIR.",
    ]
