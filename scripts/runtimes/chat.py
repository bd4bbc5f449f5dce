"""Interactive terminal chat through the Foundry Local runtime (streams tokens as they arrive), built to survive
ordinary use:

- the history is trimmed to the model's context before each request (oldest exchanges first; the system message is
  kept), and ``max_tokens`` is sized to what is left (:func:`fit_conversation`, counting with the runtime's own
  tokenizer and chat template);
- one prompt that cannot fit even alone is refused, and the session goes on;
- commands: ``/exit`` (also ``exit``, ``quit``, Ctrl-D), ``/reset``, ``/system [TEXT|-]``, ``/help``;
- Ctrl-C stops a reply (the part already printed stays in the history) without leaving; Ctrl-C twice at the prompt
  leaves;
- text holding a control string of the model's prompt format (``<|im_start|>``, …) is refused with the eval loader's
  reason (:func:`scripts.core.evalset.control_token_problem`);
- a runtime error on one turn is printed and the session goes on;
- with ``tools`` (the recipe's ``eval.tools`` set's), they are written into every prompt as ``invoke serve`` writes
  them, and the model's calls are shown as ``call name {arguments}`` lines instead of their markup.

:func:`chat_loop` takes the chat (anything with ``context``, ``count_tokens`` and ``stream``, e.g.
:class:`~scripts.runtimes.foundry_sdk.LiveChat`), a console and an input function, so tests drive it with scripted
input; it returns one :class:`Turn` per input line.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Sequence

from rich.console import Console

from scripts.core.errors import FoundryError
from scripts.core.faults import checkpoint
from scripts.core.hf_folder import control_tokens
from scripts.core.evalset import control_token_problem
from scripts.core.errors import ToolCallError
from scripts.families.tools import StreamParser, ToolFormat, served_messages
from scripts.runtimes.foundry_sdk import LiveChat

#: The shortest reply a prompt must leave room for; a prompt leaving less is refused.
MIN_REPLY = 16
EXIT_WORDS = ("/exit", "/quit", "exit", "quit")
HELP = ("/exit (or exit, quit, Ctrl-D) leaves · /reset forgets the conversation (keeps the system message) · "
        "/system TEXT sets the system message, /system - removes it, /system shows it · Ctrl-C stops a reply")


class PromptTooLong(Exception):
    """The system message and this one prompt leave less than :data:`MIN_REPLY` tokens of the context."""

    def __init__(self, prompt_tokens: int, context: int):
        super().__init__(f"{prompt_tokens} prompt tokens in a {context}-token context")
        self.prompt_tokens = prompt_tokens
        self.context = context


@dataclass
class Turn:
    """What happened to one input line. ``status``: answered, interrupted, refused, error, command, exit."""

    text: str
    status: str
    reply: str = ""
    prompt_tokens: int | None = None
    max_tokens: int | None = None
    dropped: int = 0  # messages of the history dropped to fit this request
    note: str = ""


def reply_floor(context: int, max_tokens: int) -> int:
    """Room kept for a reply when trimming: the whole ``max_tokens`` up to a quarter of the context, at least
    :data:`MIN_REPLY`."""
    return min(max_tokens, max(MIN_REPLY, context // 4))


def fit_conversation(history: Sequence[dict], prompt: dict, count: Callable[[list[dict]], int], context: int,
                     max_tokens: int) -> tuple[list[dict], int, int, int]:
    """The request for ``history`` + ``prompt`` within ``context`` tokens: drop the oldest exchanges (never the
    system message) until :func:`reply_floor` tokens are left for the reply. Returns ``(messages, messages dropped,
    prompt tokens, max_tokens for the reply)``; raises :class:`PromptTooLong` when the system message and the prompt
    alone leave less than :data:`MIN_REPLY`."""
    system = [m for m in history[:1] if m["role"] == "system"]
    turns = list(history[len(system):])
    floor = reply_floor(context, max_tokens)
    dropped = 0
    while True:
        messages = system + turns + [prompt]
        used = count(messages)
        if context - used >= floor or not turns:
            break
        cut = next((i for i, m in enumerate(turns) if i > 0 and m["role"] == "user"), len(turns))
        turns, dropped = turns[cut:], dropped + cut
    if context - used < min(MIN_REPLY, max_tokens):
        raise PromptTooLong(used, context)
    return messages, dropped, used, min(max_tokens, context - used)


class Conversation:
    """The state of one chat: the history and its system message."""

    def __init__(self, chat, console: Console, max_tokens: int, system: str | None, controls: Sequence[str],
                 tools: Sequence[dict] | None = None, tool_spec: dict | None = None):
        self.chat, self.console, self.controls = chat, console, tuple(controls)
        self.tools, self.tool_spec = (list(tools), tool_spec) if tools and tool_spec else (None, None)
        self.context = chat.context
        self.max_tokens = max_tokens
        self.history: list[dict] = []
        self.set_system(system)

    def say(self, text: str, style: str = "dim") -> None:
        self.console.print(text, style=style, markup=False, highlight=False)

    def set_system(self, text: str | None) -> None:
        self.history = [m for m in self.history if m["role"] != "system"]
        if text:
            self.history.insert(0, {"role": "system", "content": text})

    @property
    def system(self) -> str | None:
        return self.history[0]["content"] if self.history and self.history[0]["role"] == "system" else None

    def command(self, text: str) -> Turn:
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name == "/reset":
            self.history = [m for m in self.history[:1] if m["role"] == "system"]
            self.say("(conversation forgotten" + (", system message kept)" if self.system else ")"))
        elif name == "/system" and not arg:
            self.say(f"(system message: {self.system!r})" if self.system else "(no system message)")
        elif name == "/system":
            new = None if arg == "-" else arg
            problem = control_token_problem(new, self.controls) if new else None
            need = self.chat.count_tokens(([{"role": "system", "content": new}] if new else [])
                                          + [{"role": "user", "content": "x"}])
            if problem or self.context - need < MIN_REPLY:
                why = f"it {problem}" if problem else (f"it takes {need} of the {self.context}-token context, leaving "
                                                        f"less than {MIN_REPLY} for a prompt and a reply")
                self.say(f"refused: the system message was not changed: {why}.", "yellow")
                return Turn(text, "refused", note=why)
            self.set_system(new)
            self.say("(system message removed)" if new is None else f"(system message set: {need} tokens)")
        elif name == "/help":
            self.say(HELP)
        else:
            self.say(f"unknown command {name}; {HELP}", "yellow")
        return Turn(text, "command")

    def prompt_messages(self, messages: list[dict]) -> list[dict]:
        """What the runtime is given: with tools, the messages as ``invoke serve`` writes them."""
        return served_messages(self.tool_spec, messages, self.tools) if self.tools else messages

    def show(self, pieces: Sequence[str], parser: StreamParser | None, end: bool = False) -> None:
        """Print reply pieces; with tools, calls as ``call name {arguments}`` lines."""
        if parser is None:
            for piece in pieces:
                self.console.print(piece, end="", markup=False, highlight=False)
            return
        try:
            for piece in pieces:
                self._events(parser.feed(piece))
            if end:
                self._events(parser.finish())
        except ToolCallError as exc:
            self.say(f"\n(the model wrote a call that cannot be read: {exc})", "yellow")

    def _events(self, events) -> None:
        for kind, value in events:
            if kind == "text":
                self.console.print(value, end="", markup=False, highlight=False)
            else:
                self.console.print(f"\n→ call {value.name} {value.arguments}", end="", style="cyan", markup=False,
                                   highlight=False)

    def ask(self, text: str) -> Turn:
        problem = control_token_problem(text, self.controls)
        if problem:
            self.say(f"refused: your message {problem}. The conversation goes on.", "yellow")
            return Turn(text, "refused", note=problem)
        prompt = {"role": "user", "content": text}
        try:
            messages, dropped, used, budget = fit_conversation(
                self.history, prompt, lambda ms: self.chat.count_tokens(self.prompt_messages(ms)), self.context,
                self.max_tokens)
        except PromptTooLong as exc:
            why = (f"your message needs {exc.prompt_tokens} tokens" + (" with the system message" if self.system
                                                                       else "")
                   + f", and the model's context is {exc.context} tokens, leaving less than {MIN_REPLY} for a reply")
            self.say(f"refused: {why}. Shorten it; the conversation goes on.", "yellow")
            return Turn(text, "refused", prompt_tokens=exc.prompt_tokens, note=why)
        except FoundryError as exc:  # the runtime could not even measure the request
            self.say(f"error: {exc}\nThe conversation goes on without this message.", "red")
            return Turn(text, "error", note=str(exc))
        if dropped:
            self.history = messages[:-1]
            self.say(f"(dropped the {dropped} oldest messages to fit the {self.context}-token context)")
        self.console.print("[bold]model>[/bold] ", end="")
        pieces: list[str] = []
        status, note = "answered", ""
        replies = self.chat.stream(self.prompt_messages(messages), budget)
        parser = StreamParser(ToolFormat.from_json(self.tool_spec["family"], self.tool_spec["format"])) \
            if self.tools else None
        try:
            for piece in replies:
                pieces.append(piece)
                self.show([piece], parser)
                if len(pieces) == 1:
                    checkpoint("chat:reply")
        except KeyboardInterrupt:
            status, note = "interrupted", "stopped with Ctrl-C"
        except FoundryError as exc:
            status, note = "error", str(exc)
        finally:
            with contextlib.suppress(Exception):
                replies.close()  # cancels a reply still being generated
        self.show([], parser, end=True)
        self.console.print()
        if status == "error":
            self.say(f"error: {note}\nThe conversation goes on without this message.", "red")
        elif status == "interrupted":
            self.say("(reply stopped; the part shown is kept)")
        if status != "error" and (pieces or status == "answered"):
            self.history += [prompt, {"role": "assistant", "content": "".join(pieces)}]
        return Turn(text, status, "".join(pieces), used, budget, dropped, note)


def chat_loop(chat, console: Console, max_tokens: int = 256, system: str | None = None,
              read: Callable[[str], str] | None = None, controls: Sequence[str] = (),
              tools: Sequence[dict] | None = None, tool_spec: dict | None = None) -> list[Turn]:
    """Read lines until ``/exit``, Ctrl-D (EOFError) or two Ctrl-C in a row at the prompt; answer each through
    ``chat``. ``read`` defaults to ``console.input``; ``controls`` are the model's control strings; ``tools`` (OpenAI
    tools) are offered in the prompt in the format of ``tool_spec`` (:func:`scripts.families.tools.serving_spec`)."""
    read = read or console.input
    session = Conversation(chat, console, max_tokens, system, controls, tools, tool_spec)
    if max_tokens > session.context - MIN_REPLY:
        session.say(f"(--max-tokens {max_tokens} exceeds what the {session.context}-token context allows; replies "
                    "are sized to the room left)")
    turns: list[Turn] = []
    interrupted = False
    while True:
        try:
            line = read("[bold]you>[/bold] ")
        except EOFError:
            break
        except KeyboardInterrupt:
            if interrupted:
                break
            interrupted = True
            session.say("\n(Ctrl-C again, /exit or Ctrl-D leaves)")
            continue
        interrupted = False
        text = line.strip()
        if not text:
            continue
        if text.lower() in EXIT_WORDS:
            turns.append(Turn(text, "exit"))
            break
        turns.append(session.command(text) if text.startswith("/") else session.ask(text))
    console.print("bye")
    return turns


def run_chat(console: Console, cache_dir: Path, model_dir: Path, model_id: str, max_tokens: int,
             system: str | None = None, lock: Callable[[], ContextManager] = contextlib.nullcontext,
             tools: Sequence[dict] | None = None) -> list[Turn]:
    """``invoke run``: load the installed model (under ``lock``, the cache target's lock, so no install swaps it
    while it loads) and chat with it in the terminal; ``tools`` offered in every prompt (calls shown, not run)."""
    from scripts.core.hf_folder import read_chat_template
    from scripts.families.tools import serving_spec
    tool_spec = serving_spec(read_chat_template(model_dir)) if tools else None
    with lock():
        if not (model_dir / "inference_model.json").is_file():
            raise FoundryError(f"{model_id} is not installed at {model_dir}; run `invoke deploy` first.")
        chat = LiveChat(cache_dir, model_dir, model_id)
    with chat:
        console.print(f"Chatting with {model_id} through Foundry Local (context {chat.context} tokens, replies up to "
                      f"{max_tokens}). /help lists the commands; /exit or Ctrl-D leaves; Ctrl-C stops a reply.")
        if tool_spec:
            console.print(f"Tools offered ({tool_spec['family']} format, calls shown, not run): "
                          f"{', '.join(t['function']['name'] for t in tools)}.")
        return chat_loop(chat, console, max_tokens, system, controls=control_tokens(model_dir), tools=tools,
                         tool_spec=tool_spec)
