"""Chat templates against PromptTemplate: reading a tokenizer's chat template as turns, and proving that
``inference_model.json`` ``PromptTemplate`` (what the Foundry v1 CLI applies) renders the same tokens as the
tokenizer's chat template (what the Foundry v2 runtime applies).

PromptTemplate has one string per role. What the v1 CLI does with it, as we render it here:
``bos`` (the family's start-of-conversation token, which no per-role string can hold) + ``system`` filled with the
system message when there is one + ``prompt`` filled with the user message. A template that injects a **default
system prompt** when none is given (SmolLM2, Qwen2.5, Llama 3.2) gets that turn at the start of ``prompt``, so a
conversation without a system message is prompted identically on v1 and v2; with a system message, the given one
replaces the default (``system`` + the rest of ``prompt``), as the tokenizer's template does. (The v1 CLI is not
available on Linux: its composition is the documented form, verified on Windows/macOS only by users.)
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from scripts.core.errors import TemplateError
from scripts.families.registry import Family
from scripts.core.hf_folder import read_chat_template

PLACEHOLDER = "{Content}"
SAMPLE_SYSTEM = "You are a concise assistant for the orchard cooperative."
SAMPLE_USER = "When does the cider press open?"
Renderer = Callable[[list[dict[str, str]], bool], str]  # (messages, add_generation_prompt) -> prompt text


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


def render_prompt_template(prompt_template: dict[str, str], messages: list[dict[str, str]], bos: str = "",
                           default_system: str = "") -> str:
    """What PromptTemplate makes of a conversation of an optional system message and one user message (see the
    module docstring): ``bos``, ``system`` filled with the system message, then ``prompt`` filled with the user
    message; a given system message replaces the ``default_system`` turn that starts ``prompt``."""
    text = bos
    has_system = any(m["role"] == "system" for m in messages)
    for message in messages:
        if message["role"] == "system":
            text += fill(prompt_template["system"], message["content"])
        else:
            prompt = prompt_template["prompt"]
            if has_system and default_system and prompt.startswith(default_system):
                prompt = prompt[len(default_system):]
            text += fill(prompt, message["content"])
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


def tokenizer_renderer(tokenizer: Any, chat_template: str) -> Renderer:
    """A :data:`Renderer` through the tokenizer (``transformers``' own Jinja environment, e.g. ``strftime_now``)."""
    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return render


# ----- reading a chat template as turns ----------------------------------------------------------------------------
_S, _U1, _A1, _U2 = "SLMOPSSYSTEMCONTENT", "SLMOPSUSERONE", "SLMOPSASSISTANTONE", "SLMOPSUSERTWO"


@dataclass(frozen=True)
class TemplateAnalysis:
    """A chat template cut at its role boundaries. ``prompt_template``: PromptTemplate's four strings (``prompt``
    starts with ``default_system``); ``bos_token``: a start-of-conversation token kept apart (it opens the
    conversation once, not each turn); ``system_role``: native / folded / unsupported; ``default_system``: the turn
    the template injects when no system message is given ("" when none)."""

    prompt_template: dict[str, str]
    bos_token: str | None
    system_role: str
    default_system: str
    stop_tokens: tuple[str, ...]


def _after(longer: str, shorter: str, closing: str | None) -> str | None:
    """What ``longer`` adds after ``shorter``, whose ``closing`` token (a conversation's end when no generation
    prompt follows, e.g. Phi-3's eos) does not stay; None when ``longer`` does not continue ``shorter``."""
    if longer.startswith(shorter):
        return longer[len(shorter):]
    if closing and shorter.endswith(closing) and longer.startswith(shorter[:-len(closing)]):
        return longer[len(shorter) - len(closing):]
    return None


def _strip_closing(text: str, closing: str | None) -> str:
    return text[:-len(closing)] if closing and text.endswith(closing) else text


def analyse_chat_template(render: Renderer, bos_token: str | None, eos_token: str | None,
                          where: str) -> TemplateAnalysis:
    """Cut a chat template into PromptTemplate's strings at real role boundaries: a later user turn is what a
    conversation gains when a user message follows an assistant turn, so every field starts where a role starts
    (for ChatML, ``prompt`` starts with ``<|im_start|>``)."""
    u1, a1 = {"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}
    u2 = {"role": "user", "content": _U2}
    try:
        one, one_open = render([u1], False), render([u1], True)
        # a template may close a conversation that ends without a generation prompt (Phi-3: eos after the last turn)
        closing = eos_token if eos_token and one.endswith(eos_token) and not one_open.startswith(one) else None
        generation_prompt = _after(one_open, one, closing) or ""
        two_turns = render([u1, a1], False)
        turn = _after(render([u1, a1, u2], True), two_turns, closing)
        assistant_turn = _after(two_turns, one, closing)
    except TemplateError as exc:
        raise TemplateError(f"{where}: cannot read the chat template as turns ({exc}); set model.family.") from None
    if turn is None or turn.count(_U2) != 1:
        raise TemplateError(f"{where}: cannot derive PromptTemplate: a user turn after an assistant turn does not "
                            "render as an addition to the conversation. Choose a family with model.family instead.")
    prompt_part = turn.replace(_U2, PLACEHOLDER)
    whole = render([u1, a1, u2], True)
    bos = bos_token if bos_token and whole.startswith(bos_token) and whole.count(bos_token) == 1 else None

    def strip_bos(text: str) -> str:
        return text[len(bos):] if bos and text.startswith(bos) else text

    user_only = strip_bos(render([{"role": "user", "content": _U2}], True))
    head = user_only[:-len(turn)] if user_only.endswith(turn) else None
    default_system = head or ""
    prompt = (default_system + prompt_part) if head is not None else user_only.replace(_U2, PLACEHOLDER)
    system, role = PLACEHOLDER + "\n\n", "folded"
    try:
        with_system = strip_bos(render([{"role": "system", "content": _S}, {"role": "user", "content": _U2}], True))
        if with_system.endswith(turn) and with_system[:-len(turn)].count(_S) == 1:
            system, role = with_system[:-len(turn)].replace(_S, PLACEHOLDER), "native"
    except Exception:  # noqa: BLE001 - a template may refuse a system message (raise_exception): say so
        role = "unsupported"
    user = prompt_part[:-len(generation_prompt)] if generation_prompt and prompt_part.endswith(generation_prompt) \
        else prompt_part
    assistant = (_strip_closing(assistant_turn, closing).replace(_A1, PLACEHOLDER)
                 if assistant_turn and assistant_turn.count(_A1) == 1 else PLACEHOLDER)
    return TemplateAnalysis({"system": system, "user": user, "assistant": assistant, "prompt": prompt}, bos, role,
                            default_system, tuple(t for t in (eos_token,) if t))


def analyse_model_template(model_dir: Path, tokenizer: Any = None, chat_template: str | None = None) -> TemplateAnalysis:
    """:func:`analyse_chat_template` of the template Foundry Local applies from ``model_dir`` (or ``chat_template``),
    rendered through the model's tokenizer."""
    tok = tokenizer or load_tokenizer(model_dir)
    template = chat_template or read_chat_template(Path(model_dir))
    if template is None:
        raise TemplateError(f"{model_dir}: the tokenizer has no chat template to read.")
    return analyse_chat_template(tokenizer_renderer(tok, template), tok.bos_token, tok.eos_token, str(model_dir))


def with_default_system(prompt_template: dict[str, str], default_system: str) -> dict[str, str]:
    """A family's PromptTemplate whose ``prompt`` starts with the default system turn the tokenizer injects."""
    if not default_system or prompt_template["prompt"].startswith(default_system):
        return prompt_template
    return {**prompt_template, "prompt": default_system + prompt_template["prompt"]}


# ----- verification ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TemplateComparison:
    """One verification conversation rendered by PromptTemplate (Foundry v1) and by the tokenizer's chat template
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


def compare_templates(prompt_template: dict[str, str], model_dir: Path, family: Family | None = None,
                      tokenizer: Any = None, chat_template: str | None = None,
                      default_system: str = "") -> list[TemplateComparison]:
    """Render the fixed conversations both ways and tokenize both renderings with the model's tokenizer. The chat
    side uses ``chat_template`` (default: the one Foundry Local applies from ``model_dir``, see
    :func:`~scripts.core.hf_folder.read_chat_template`), not whichever transformers would pick."""
    tokenizer = tokenizer or load_tokenizer(model_dir)
    render = tokenizer_renderer(tokenizer, chat_template or read_chat_template(Path(model_dir)))
    bos = (family.bos_token or "") if family is not None else ""

    def tokens(text: str) -> tuple[str, ...]:
        return tuple(tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False)))

    out = []
    for case, messages in sample_conversations(family).items():
        expected = render_prompt_template(prompt_template, messages, bos, default_system)
        rendered = render(messages, True)
        out.append(TemplateComparison(case, expected, rendered, tokens(expected), tokens(rendered)))
    return out


def check_template_agreement(prompt_template: dict[str, str], model_dir: Path, where: str,
                             family: Family | None = None, tokenizer: Any = None,
                             chat_template: str | None = None, default_system: str = "") -> list[TemplateComparison]:
    """Raise :class:`TemplateError` with a diff when PromptTemplate and the tokenizer's template disagree (text or
    tokens); return the comparisons when they agree."""
    try:
        comparisons = compare_templates(prompt_template, model_dir, family, tokenizer, chat_template, default_system)
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
