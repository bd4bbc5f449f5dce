"""Test helper: a sandbox for running `invoke` as a user would — its own build folder, Foundry cache, recipes and home,
no fault-injection variables inherited — and the command that runs it there."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from scripts.core.faults import KILL_ENV, NO_EXCHANGE_ENV, PAUSE_ENV, PAUSE_FIFO_ENV

REPO = Path(__file__).resolve().parent.parent
INVOKE = [sys.executable, "-m", "invoke"]


def make_sandbox(root: Path, installed: str, hf: Path | None = None) -> dict:
    """Folders and environment under ``root``; ``installed``: the model's folder under the cache
    (``publisher/name``). The recipes folder is created empty."""
    recipes = root / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SLMOPS_BUILD_DIR=str(root / "build"), SLMOPS_FOUNDRY_CACHE=str(root / "cache"),
               SLMOPS_RECIPES_DIR=str(recipes), HOME=str(root / "home"), XDG_CACHE_HOME=str(root / "home/.cache"),
               HF_HUB_OFFLINE="1", COLUMNS="250", PYTHONUNBUFFERED="1")
    for key in (KILL_ENV, PAUSE_ENV, PAUSE_FIFO_ENV, NO_EXCHANGE_ENV):
        env.pop(key, None)
    return {"root": root, "env": env, "recipes": recipes, "cache": root / "cache", "build": root / "build",
            "installed": root / "cache" / installed, "hf": hf}


def invoke(sandbox: dict, *args, timeout: float = 900, **env) -> subprocess.CompletedProcess:
    """``invoke ARGS`` in the sandbox (``env``: extra variables, e.g. a kill point)."""
    return subprocess.run(INVOKE + list(args), cwd=REPO, env={**sandbox["env"], **env}, capture_output=True,
                          text=True, timeout=timeout)
