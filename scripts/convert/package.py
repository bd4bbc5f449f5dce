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

from scripts import settings
from scripts.errors import TemplateError
from scripts.families.registry import Family
from scripts.recipe.load import Generation, Recipe
from scripts.sources.folder import read_chat_template

PROMPT_KEYS = ("system", "user", "assistant", "prompt")
PLACEHOLDER = "{Content}"
SAMPLE_SYSTEM = "You are a concise assistant for the orchard cooperative."
SAMPLE_USER = "When does the cider press open?"

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
    """A copy of ``genai_config`` whose ``search`` carries the recipe's generation settings."""
    context = genai_config.get("model", {}).get("context_length")
    return {**genai_config, "search": {**genai_config.get("search", {}), **search_options(generation, context)}}


@dataclass(frozen=True)
class TemplateComparison:
    """One fixed conversation rendered through PromptTemplate (Foundry v1) and the tokenizer's chat template
    (Foundry v2), as text and as token ids (both encoded without adding special tokens, as Hugging Face's
    ``apply_chat_template(tokenize=True)`` does)."""

    case: str
    from_prompt_template: str
    from_chat_template: str
    prompt_template_tokens: tuple[str, ...] = ()
    chat_template_tokens: tuple[str, ...] = ()

    @property
    def agrees(self) -> bool:
        return (self.from_prompt_template == self.from_chat_template
                and self.prompt_template_tokens == self.chat_template_tokens)

    def token_diff(self, context: int = 3) -> str:
        """Where the two token sequences first differ, with a few tokens either side."""
        a, b = self.chat_template_tokens, self.prompt_template_tokens
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if a == b:
            return "same tokens"
        lo = max(0, first - context)
        return (f"first different token at position {first} ({len(a)} vs {len(b)} tokens): "
                f"tokenizer chat template {list(a[lo:first + context + 1])} vs PromptTemplate "
                f"{list(b[lo:first + context + 1])}")


def fill(template: str, content: str) -> str:
    return template.replace(PLACEHOLDER, content)


def sample_conversations(family: Family | None = None) -> dict[str, list[dict[str, str]]]:
    """The fixed conversations every deployment is verified with. "system + user" only where the family's chat
    template gives the system message a turn of its own (``system_role`` native): Gemma folds it into the first
    user turn and Mistral v0.1 refuses it, and no PromptTemplate (one string per role) can say that."""
    cases = {"user only": [{"role": "user", "content": SAMPLE_USER}]}
    if family is None or family.system_role == "native":
        cases["system + user"] = [{"role": "system", "content": SAMPLE_SYSTEM}, {"role": "user", "content": SAMPLE_USER}]
    return cases


def render_prompt_template(prompt_template: dict[str, str], messages: list[dict[str, str]], bos: str = "") -> str:
    """What PromptTemplate makes of a conversation of an optional system message and one user message: the
    family's start-of-conversation token (``bos_token``, which PromptTemplate cannot hold), ``system`` filled with
    the system message, then ``prompt`` filled with the user message."""
    text = bos
    for message in messages:
        key = "system" if message["role"] == "system" else "prompt"
        text += fill(prompt_template[key], message["content"])
    return text


def render_chat_template(template: str, messages: list[dict[str, str]], bos_token: str = "", eos_token: str = "",
                         add_generation_prompt: bool = True) -> str:
    """Render a Hugging Face chat template the way ``transformers`` does (sandboxed Jinja, trim_blocks,
    lstrip_blocks, ``raise_exception``), without loading a tokenizer: for golden files and unit tests."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(f"chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                            add_generation_prompt=add_generation_prompt)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer  # heavy import, only when needed

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def compare_templates(prompt_template: dict[str, str], model_dir: Path, family: Family | None = None,
                      tokenizer: Any = None, chat_template: str | None = None) -> list[TemplateComparison]:
    """Render the fixed conversations both ways and tokenize both renderings with the model's tokenizer. The chat
    side uses ``chat_template`` (default: the one Foundry Local applies from ``model_dir``, see
    :func:`~scripts.sources.folder.read_chat_template`), not whichever transformers would pick."""

    tokenizer = tokenizer or load_tokenizer(model_dir)
    chat_template = chat_template or read_chat_template(Path(model_dir))
    bos = (family.bos_token or "") if family is not None else ""
    out = []
    for case, messages in sample_conversations(family).items():
        expected = render_prompt_template(prompt_template, messages, bos)
        rendered = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                                 add_generation_prompt=True)

        def tokens(text: str) -> tuple[str, ...]:
            return tuple(tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False)))

        out.append(TemplateComparison(case, expected, rendered, tokens(expected), tokens(rendered)))
    return out


def check_template_agreement(prompt_template: dict[str, str], model_dir: Path, where: str,
                             family: Family | None = None, tokenizer: Any = None,
                             chat_template: str | None = None) -> list[TemplateComparison]:
    """Raise :class:`TemplateError` with a diff when PromptTemplate and the tokenizer's template disagree (text or
    tokens); return the comparisons when they agree."""
    try:
        comparisons = compare_templates(prompt_template, model_dir, family, tokenizer, chat_template)
    except TemplateError as exc:
        raise TemplateError(f"{where}: {exc}. Its chat template cannot render the verification conversation "
                            f"{list(sample_conversations(family))}.") from exc
    bad = [c for c in comparisons if not c.agrees]
    if bad:
        diffs = "\n".join(f"  case {c.case}:\n" + "\n".join(
            "    " + line for line in difflib.unified_diff(
                c.from_chat_template.splitlines(keepends=True), c.from_prompt_template.splitlines(keepends=True),
                "tokenizer chat template (Foundry v2)", "PromptTemplate (Foundry v1)", lineterm="")) +
            f"\n    tokens: {c.token_diff()}" for c in bad)
        raise TemplateError(f"{where}: inference_model.json PromptTemplate and the tokenizer's chat template render "
                            f"different prompts, so the model would behave differently per platform:\n{diffs}\n"
                            "Pick the family that matches the tokenizer (model.family in the recipe) or fix the "
                            "tokenizer's chat template.")
    return comparisons


# ----- auto-template: PromptTemplate derived from the tokenizer's own chat template ----------------------------
_SENTINEL = {"system": "SLMOPSSYSTEMCONTENT", "user": "SLMOPSUSERCONTENT", "assistant": "SLMOPSASSISTANTCONTENT"}


@dataclass(frozen=True)
class DerivedTemplate:
    prompt_template: dict[str, str]
    bos_token: str | None
    system_role: str
    stop_tokens: tuple[str, ...]


def derive_prompt_template(model_dir: Path, tokenizer: Any = None) -> DerivedTemplate:
    """Render the tokenizer's chat template with placeholder contents and cut it into PromptTemplate's per-role
    strings (``{Content}`` where each message went). A leading bos token is kept apart (``bos_token``); a template
    that refuses a system message, or folds it into the user turn, gets ``system_role`` unsupported / folded and
    a plain ``{Content}\\n\\n`` system entry."""

    tok = tokenizer or load_tokenizer(model_dir)
    template = read_chat_template(Path(model_dir))  # the one Foundry Local applies
    s, u, a = (_SENTINEL[k] for k in ("system", "user", "assistant"))

    def render(messages, generation_prompt=True) -> str:
        return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                       add_generation_prompt=generation_prompt)

    user_turn = [{"role": "user", "content": u}]
    prompt = render(user_turn)
    bos = tok.bos_token if tok.bos_token and prompt.startswith(tok.bos_token) else None

    def strip_bos(text: str) -> str:
        return text[len(bos):] if bos and text.startswith(bos) else text

    prompt = strip_bos(prompt)
    if prompt.count(u) != 1:
        raise TemplateError(f"{model_dir}: cannot derive PromptTemplate: the chat template does not render a user "
                            "message exactly once. Choose a family with model.family instead.")
    system, role = PLACEHOLDER + "\n\n", "folded"
    try:
        with_system = strip_bos(render([{"role": "system", "content": s}] + user_turn))
        if with_system.endswith(prompt) and with_system[:-len(prompt)].count(s) == 1:
            system, role = with_system[:-len(prompt)].replace(s, PLACEHOLDER), "native"
    except Exception:  # noqa: BLE001 - a template may refuse a system message (raise_exception): say so
        role = "unsupported"
    user_only = strip_bos(render(user_turn, False))
    if tok.eos_token and user_only.endswith(tok.eos_token):  # Phi-3 ends a conversation without a prompt with eos
        user_only = user_only[:-len(tok.eos_token)]
    assistant = PLACEHOLDER
    try:
        both = strip_bos(render(user_turn + [{"role": "assistant", "content": a}], False))
        if both.startswith(user_only) and both[len(user_only):].count(a) == 1:
            assistant = both[len(user_only):].replace(a, PLACEHOLDER)
    except Exception:  # noqa: BLE001 - informational key only
        pass
    stops = tuple(t for t in (tok.eos_token,) if t)
    return DerivedTemplate({"system": system, "user": user_only.replace(u, PLACEHOLDER), "assistant": assistant,
                            "prompt": prompt.replace(u, PLACEHOLDER)}, bos, role, stops)
