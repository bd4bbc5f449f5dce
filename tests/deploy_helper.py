"""Test helper: run the deploy chain (``scripts.pipeline.Pipeline``) for a recipe document in its own process, with
its own build folder, Foundry cache and home under ``root`` (real Olive, real Foundry Local runtime)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from scripts.core.settings import REPO_ROOT

_DEPLOY = """
import json, sys
from pathlib import Path
from scripts.core.errors import SlmopsError
from scripts.pipeline import Pipeline
from scripts.recipe.load import parse_recipe
try:
    out = Pipeline(parse_recipe(json.loads(sys.argv[1]), Path(sys.argv[2])), announce=print).run()
    print("RESULT", json.dumps({n: {"skipped": o.skipped, "result": o.result} for n, o in out.items()}, default=str))
except SlmopsError as exc:
    print("error:", exc, file=sys.stderr)
    sys.exit(1)
"""


def env_for(root: Path) -> dict[str, str]:
    return dict(os.environ, SLMOPS_BUILD_DIR=str(root / "build"), SLMOPS_FOUNDRY_CACHE=str(root / "cache"),
                HOME=str(root / "home"), XDG_CACHE_HOME=str(root / "home/.cache"), HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false")


def deploy_doc(doc: dict, root: Path, timeout: float = 900) -> tuple[dict, str]:
    """Deploy ``doc`` (a recipe document; relative paths from ``root``); return each step's outcome and stdout."""
    proc = subprocess.run([sys.executable, "-c", _DEPLOY, json.dumps(doc), str(root / "recipe.json")], cwd=REPO_ROOT,
                          env=env_for(root), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0]), proc.stdout
