"""The app-facing configuration of a deployed model.

- ``inference_model.json`` is rendered from the family's Jinja template (StrictUndefined). The Foundry v1 CLI
  uses its ``PromptTemplate``; the v2 runtime ignores it and applies the tokenizer's chat template, so the two
  are checked to render the same tokens.
- Generation settings are written into ``genai_config.json`` ``search``, the only place either runtime reads
  them (``ModelConfig`` in ``inference_model.json`` is documentation only).
"""
from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jinja2

from . import settings
from .errors import TemplateError
from .families import Family
from .recipe import Generation, Recipe

PROMPT_KEYS = ("system", "user", "assistant", "prompt")
PLACEHOLDER = "{Content}"
SAMPLE_SYSTEM = "You are a concise assistant for the orchard cooperative."
SAMPLE_USER = "When does the cider press open?"

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(settings.TEMPLATES_DIR), undefined=jinja2.StrictUndefined,
                          autoescape=False, keep_trailing_newline=True)


def render_inference_model(family: Family, recipe: Recipe) -> dict[str, Any]:
    """Render and parse ``inference_model.json`` for ``recipe`` with its family's template."""
    try:
        text = _env.get_template(family.template_name).render(
            name=recipe.foundry.name, description=recipe.foundry.description or recipe.description,
            version=recipe.foundry.version, family=family.name, recipe_name=recipe.name,
            model_config={"generation": asdict(recipe.generation), "precision": recipe.conversion.precision,
                          "note": "informational: runtimes read generation settings from genai_config.json search"})
        doc = json.loads(text)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"templates/{family.template_name}: {exc}. Fix the family template.") from exc
    except json.JSONDecodeError as exc:
        raise TemplateError(f"templates/{family.template_name} rendered invalid JSON (line {exc.lineno}: {exc.msg}). "
                            "Fix the family template.") from exc
    template = doc.get("PromptTemplate")
    missing = [k for k in PROMPT_KEYS if not isinstance((template or {}).get(k), str) or PLACEHOLDER not in template[k]]
    if not isinstance(doc.get("Name"), str) or missing:
        raise TemplateError(f"templates/{family.template_name}: needs a string Name and PromptTemplate keys "
                            f"{PROMPT_KEYS} each containing {PLACEHOLDER}; problem with: {missing or ['Name']}.")
    return doc


def search_options(generation: Generation, context_length: int | None) -> dict[str, Any]:
    """The ``genai_config.json`` ``search`` entries for the recipe's generation settings."""
    if context_length is not None and generation.max_length > context_length:
        raise TemplateError(f"generation.max_length {generation.max_length} exceeds the model's context length "
                            f"{context_length}; lower it in the recipe.")
    return {"max_length": generation.max_length, "do_sample": generation.do_sample,
            "temperature": generation.temperature, "top_p": generation.top_p, "top_k": generation.top_k,
            "repetition_penalty": generation.repetition_penalty}


def with_search(genai_config: dict[str, Any], generation: Generation) -> dict[str, Any]:
    """A copy of ``genai_config`` whose ``search`` carries the recipe's generation settings."""
    context = genai_config.get("model", {}).get("context_length")
    return {**genai_config, "search": {**genai_config.get("search", {}), **search_options(generation, context)}}


@dataclass(frozen=True)
class TemplateComparison:
    case: str
    from_prompt_template: str
    from_chat_template: str

    @property
    def agrees(self) -> bool:
        return self.from_prompt_template == self.from_chat_template


def fill(template: str, content: str) -> str:
    return template.replace(PLACEHOLDER, content)


def compare_templates(prompt_template: dict[str, str], model_dir: Path) -> list[TemplateComparison]:
    """Render fixed conversations (user alone; system + user) both ways."""
    from transformers import AutoTokenizer  # heavy import, only when needed

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    cases = {
        "user only": ([{"role": "user", "content": SAMPLE_USER}], fill(prompt_template["prompt"], SAMPLE_USER)),
        "system + user": ([{"role": "system", "content": SAMPLE_SYSTEM}, {"role": "user", "content": SAMPLE_USER}],
                          fill(prompt_template["system"], SAMPLE_SYSTEM) + fill(prompt_template["prompt"], SAMPLE_USER)),
    }
    out = []
    for case, (messages, expected) in cases.items():
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append(TemplateComparison(case, expected, rendered))
    return out


def check_template_agreement(prompt_template: dict[str, str], model_dir: Path, where: str) -> None:
    """Raise :class:`TemplateError` with a diff when PromptTemplate and the tokenizer's template disagree."""
    bad = [c for c in compare_templates(prompt_template, model_dir) if not c.agrees]
    if bad:
        diffs = "\n".join(f"  case {c.case}:\n" + "\n".join(
            "    " + line for line in difflib.unified_diff(
                c.from_chat_template.splitlines(keepends=True), c.from_prompt_template.splitlines(keepends=True),
                "tokenizer chat template (Foundry v2)", "PromptTemplate (Foundry v1)", lineterm="")) for c in bad)
        raise TemplateError(f"{where}: inference_model.json PromptTemplate and the tokenizer's chat template render "
                            f"different prompts, so the model would behave differently per platform:\n{diffs}\n"
                            "Pick the family that matches the tokenizer (model.family in the recipe) or fix the "
                            "tokenizer's chat template.")
