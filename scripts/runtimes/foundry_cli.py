"""The v1 ``foundry`` CLI (Windows/macOS): ``foundry cache location``, ``foundry cache ls``, ``foundry model load``,
``foundry model run NAME --prompt``. Not available on Linux: driven through a replaceable command runner so it is
unit-tested without the CLI (the syntax of ``model run --prompt`` is assumed, unverified here)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from scripts.core.errors import FoundryError
from scripts.runtimes.foundry_api import Answer, CheckResult, inference_model_name, validate_messages, validate_model_dir
from scripts.core.workers import tail


def foundry_cli_available() -> bool:
    """True when a ``foundry`` executable (the v1 CLI of Windows/macOS) is on PATH."""
    return shutil.which("foundry") is not None


Runner = Callable[[Sequence[str], float], subprocess.CompletedProcess]


def _default_runner(args: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def _cli(args: Sequence[str], timeout: float = 120, runner: Runner | None = None) -> str:
    cmd = ["foundry", *args]
    try:
        proc = (runner or _default_runner)(cmd, timeout)
    except FileNotFoundError as exc:
        raise FoundryError("The foundry CLI is not on PATH; install Foundry Local or use the SDK.") from exc
    except subprocess.TimeoutExpired as exc:
        raise FoundryError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s.") from exc
    if proc.returncode != 0:
        raise FoundryError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): "
                           f"{tail(proc.stderr or proc.stdout, 10)}")
    return proc.stdout or ""


def cli_cache_location(runner: Runner | None = None) -> Path:
    """Parse ``foundry cache location`` (prints e.g. ``💾 Cache directory path: C:\\...\\models``)."""
    out = _cli(["cache", "location"], runner=runner)
    for line in reversed(out.strip().splitlines()):
        m = re.search(r"(?:path|location)\s*:\s*(.+)$", line, re.IGNORECASE)
        candidate = (m.group(1) if m else line).strip().strip('"')
        if candidate and (os.sep in candidate or "/" in candidate or "\\" in candidate):
            return Path(candidate)
    raise FoundryError(f"Could not read a path from `foundry cache location`: {out.strip()!r}")


def cli_model_name(model_dir: Path) -> str:
    """The name the v1 CLI lists a cache folder under: ``inference_model.json`` ``Name``."""
    name = inference_model_name(model_dir)
    if not name:
        raise FoundryError(f"{model_dir}/inference_model.json is missing or has no string 'Name'; the "
                           "Foundry Local CLI only lists folders that have one.")
    return name


def cli_is_listed(name: str, runner: Runner | None = None) -> bool:
    out = _cli(["cache", "ls"], runner=runner)
    return any(re.search(rf"(^|\s){re.escape(name)}(\s|$)", line) for line in out.splitlines())


def cli_check_model(model_dir: Path, conversations: Sequence[Sequence[dict]], timeout: float = 600,
                    runner: Runner | None = None) -> CheckResult:
    """v1 CLI check: listed by ``foundry cache ls``, ``foundry model load``, then one
    ``foundry model run NAME --prompt TEXT`` per conversation (the CLI takes one prompt: the last
    user message; it applies the model's ``PromptTemplate``). Token counts are not reported."""
    validate_model_dir(model_dir)
    name = cli_model_name(model_dir)
    if not cli_is_listed(name, runner):
        raise FoundryError(f"`foundry cache ls` does not list {name}; is {model_dir} inside the folder "
                           "`foundry cache location` prints (as <publisher>/<name>/)?")
    t0 = time.perf_counter()
    _cli(["model", "load", name], timeout=timeout, runner=runner)
    load_seconds = time.perf_counter() - t0
    answers = []
    for conv in conversations:
        validate_messages(conv)
        prompt = next((m["content"] for m in reversed(conv) if m["role"] == "user"), conv[-1]["content"])
        t0 = time.perf_counter()
        out = _cli(["model", "run", name, "--prompt", prompt], timeout=timeout, runner=runner)
        answers.append(Answer(text=out.strip(), seconds=time.perf_counter() - t0,
                              first_token_seconds=None, tokens=None))
    return CheckResult(model_id=name, listed=True, load_seconds=load_seconds, answers=answers,
                       registration="cli")
