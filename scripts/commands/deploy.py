"""``invoke deploy``: the whole chain for one recipe (:class:`~scripts.pipeline.Pipeline`), then the proof
(bench and validate, :mod:`scripts.proof.run`), summarised for the console."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from scripts.core.fileops import folder_size
from scripts.pipeline import Announce, Pipeline
from scripts.proof.measure import get_profile
from scripts.proof.run import run_proof
from scripts.recipe.spec import Recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeploySummary:
    recipe: str
    model_id: str
    installed: Path
    size_bytes: int
    check: dict[str, Any]
    skipped: list[str]
    ran: list[str]
    proof: dict[str, Any] = field(default_factory=dict)  # bench/validate summary and the report path
    fidelity: dict[str, Any] | None = None  # the fidelity gate's figures (scripts.proof.gate), None: not gated


def deploy(recipe: Recipe, force: bool = False, announce: Announce = log.info,
           status: Callable[[str], Any] | None = None, proof: str | None = "quick", wait: bool = True) -> DeploySummary:
    """Run the whole chain for ``recipe`` and summarise the result. ``proof``: the bench/validate profile
    (``quick`` or ``full``) run after ``check``, or None to skip them. ``wait``: when another command holds the
    recipe's build folder or the cache target, wait for it (False: raise :class:`~scripts.core.errors.BusyError`)."""
    pipeline = Pipeline(recipe, force=force, announce=announce, status=status, wait=wait)
    with pipeline.locked():
        outcomes = pipeline.run()
        skipped, ran = [n for n, o in outcomes.items() if o.skipped], [n for n, o in outcomes.items() if not o.skipped]
        proven: dict[str, Any] = {}
        if proof:
            proven = run_proof(pipeline, get_profile(proof), status or (lambda s: None))
            skipped, ran = skipped + proven["skipped"], ran + proven["ran"]
        size = folder_size(pipeline.installed_dir)
    gate = outcomes.get("fidelity")
    return DeploySummary(recipe.name, recipe.foundry.model_id, pipeline.installed_dir, size,
                         outcomes["check"].result or {}, skipped, ran, proven, gate.result if gate else None)
