"""``invoke models`` and ``invoke rollback``: the installed versions (:mod:`scripts.convert.versions`) of the Foundry
cache, and making an earlier one current under the model's lock."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from scripts.convert import versions
from scripts.core.errors import InstallError


def models_lines(cache_root: Path) -> list[str]:
    """What is installed, one version a line (80 columns)."""
    return versions.models_table(cache_root)


def rollback(pipeline, to: Any = None) -> dict[str, Any]:
    """Make kept version ``to`` (default: the one before the current) of the recipe's model current, crash-safely,
    holding the model's lock (which also finishes or undoes an install or rollback killed earlier)."""
    if to is not None:
        try:
            to = int(to)
        except ValueError:
            raise InstallError(f"--to must be a version number (`invoke models` lists them), got {to!r}.") from None
    f = pipeline.recipe.foundry
    with pipeline.cache_locked():
        for note in versions.clean_versions(versions.versions_root(pipeline.cache_root, f.publisher, f.name)):
            pipeline.announce(f"recovered: {note}")
        return versions.rollback(pipeline.cache_root, f.publisher, f.name, pipeline.installed_dir, to,
                                 announce=pipeline.announce)
