"""Interactive terminal chat through the Foundry Local runtime (streams tokens as they arrive)."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from scripts.errors import FoundryError
from scripts.runtimes.foundry_sdk import LiveChat


def chat_loop(console: Console, cache_dir: Path, model_dir: Path, model_id: str, max_tokens: int,
              system: str | None = None) -> None:
    if not (model_dir / "inference_model.json").is_file():
        raise FoundryError(f"{model_id} is not installed at {model_dir}; run `invoke deploy` first.")
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    console.print(f"Chatting with {model_id} through Foundry Local. Empty line or Ctrl-D to quit.")
    with LiveChat(cache_dir, model_dir, model_id) as chat:
        while True:
            try:
                prompt = console.input("[bold]you>[/bold] ").strip()
            except EOFError:
                break
            if not prompt:
                break
            history.append({"role": "user", "content": prompt})
            console.print("[bold]model>[/bold] ", end="")
            reply = []
            for piece in chat.stream(history, max_tokens):
                reply.append(piece)
                console.print(piece, end="", markup=False)
            console.print()
            history.append({"role": "assistant", "content": "".join(reply)})
