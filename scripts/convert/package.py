"""The app-facing configuration of a deployed model.

- ``inference_model.json`` is rendered from the family's Jinja template (StrictUndefined). The Foundry v1 CLI
  uses its ``PromptTemplate``; the v2 runtime ignores it and applies the tokenizer's chat template, so the two
  are checked to render the same tokens (:mod:`scripts.families.templates`).
- Generation settings are written into ``genai_config.json`` ``search``, the only place either runtime reads
  them (``ModelConfig`` in ``inference_model.json`` is documentation only).
- The recipe's ``runtime`` settings (intra-op threads) go to ``model.decoder.session_options``, read by ONNX Runtime
  GenAI inside Foundry Local as well.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import jinja2

from scripts.core import settings
from scripts.core.errors import TemplateError
from scripts.core.fileops import atomic_dir, link_or_copy, write_json_atomic
from scripts.families.registry import Family
from scripts.families.templates import PLACEHOLDER
from scripts.recipe.spec import Generation, Recipe

log = logging.getLogger(__name__)

PROMPT_KEYS = ("system", "user", "assistant", "prompt")

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(settings.TEMPLATES_DIR), undefined=jinja2.StrictUndefined,
                          autoescape=False, keep_trailing_newline=True)


def _tojson_dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` for the ``tojson`` filter that reports an undefined variable as Jinja's UndefinedError
    (naming the variable) instead of a bare "StrictUndefined is not JSON serializable" TypeError."""

    def default(obj: Any) -> Any:
        if isinstance(obj, jinja2.Undefined):
            obj._fail_with_undefined_error()
        raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")

    return json.dumps(value, default=default, **kwargs)


_env.policies["json.dumps_function"] = _tojson_dumps


def render_inference_model(family: Family, recipe: Recipe, generation: Generation | None = None,
                           prompt_template: dict[str, str] | None = None) -> dict[str, Any]:
    """Render and parse ``inference_model.json`` for ``recipe`` with its family's template. ``generation`` is the
    resolved generation settings (recipe over family defaults); ``prompt_template`` feeds the ``auto-template``
    template (PromptTemplate derived from the tokenizer)."""
    try:
        text = _env.get_template(family.template_name).render(
            name=recipe.foundry.name, description=recipe.foundry.description or recipe.description,
            version=recipe.foundry.version, family=family.name, recipe_name=recipe.name,
            prompt_template=prompt_template or {},
            model_config={"generation": asdict(generation or recipe.generation),
                          "precision": recipe.conversion.precision, "stop_tokens": list(family.stop_tokens),
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
    """A copy of ``genai_config`` whose ``search`` carries the recipe's generation settings.

    A ``max_length`` below the model's ``context_length`` also lowers ``model.context_length`` to it. ONNX Runtime
    GenAI refuses a prompt + reply longer than ``search.max_length``; Foundry Local goes by ``context_length``
    alone — on the 0.5B shape (context 32,768, max_length 4,096) it took a 23,011-token prompt (229 s of prefill) —
    and sizes each request's KV cache for it: 805 MB per request there instead of 100 MB, and a 128-token TTFT 353
    vs 327 ms (raw GenAI 316 ms; medians of 5 interleaved rounds). One limit, the recipe's, in both runtimes."""
    context = genai_config.get("model", {}).get("context_length")
    out = {**genai_config, "search": {**genai_config.get("search", {}), **search_options(generation, context)}}
    if context is not None and generation.max_length < context:
        log.info("model.context_length %d → %d (generation.max_length: Foundry Local's limit and KV cache size too)",
                 context, generation.max_length)
        out["model"] = {**genai_config["model"], "context_length": generation.max_length}
    return out


def with_session_options(genai_config: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``genai_config`` whose ``model.decoder.session_options`` carries ``options`` (the recipe's
    ``runtime`` block; other session options the builder wrote, e.g. provider options, are kept)."""
    model = genai_config.get("model", {})
    decoder = model.get("decoder", {})
    session = {**decoder.get("session_options", {}), **options}
    return {**genai_config, "model": {**model, "decoder": {**decoder, "session_options": session}}}


def mirror_with_config(model_dir: Path, out: Path, rewrite: Callable[[dict[str, Any]], dict[str, Any]]) -> Path:
    """``model_dir`` re-created at ``out`` (replaced atomically): every file hard-linked, ``genai_config.json`` as
    ``rewrite`` returns it — a variant of an installed model (thread count, profiling, a minimum length) sharing its
    weights."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    with atomic_dir(Path(out)) as staging:
        for f in model_dir.iterdir():
            if f.is_file() and f.name != "genai_config.json":
                link_or_copy(f, staging / f.name)
        write_json_atomic(staging / "genai_config.json", rewrite(config))
    return Path(out)
