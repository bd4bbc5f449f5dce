"""Where things live. Every user-state path comes from an environment variable with a default,
so tests can point everything at temporary folders.

- ``SLMOPS_BUILD_DIR``: build outputs and step stamps (default ``<repo>/build``).
- ``SLMOPS_FOUNDRY_CACHE``: Foundry Local model cache root when no ``foundry`` CLI is on PATH
  (default ``~/.foundry/cache/models``).
- ``SLMOPS_RECIPES_DIR``: where ``--model NAME`` recipes are looked up (default ``<repo>/recipes``).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATES_DIR = REPO_ROOT / "templates"


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


def build_dir() -> Path:
    """Root of build outputs (converted models, stamps, reports)."""
    return _env_path("SLMOPS_BUILD_DIR", REPO_ROOT / "build")


def recipes_dir() -> Path:
    """Folder holding ``<name>.json`` recipes."""
    return _env_path("SLMOPS_RECIPES_DIR", REPO_ROOT / "recipes")


def default_foundry_cache() -> Path:
    """Foundry Local cache root used when the ``foundry`` CLI cannot tell us its own."""
    return _env_path("SLMOPS_FOUNDRY_CACHE", Path.home() / ".foundry" / "cache" / "models")
