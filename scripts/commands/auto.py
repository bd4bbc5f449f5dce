"""`--precision auto`: search the layouts a model has (:func:`scripts.commands.layouts.auto_candidates`: INT8, INT4
re-quantization layouts, a GGUF's own blocks carried exactly, the adapter as a branch at each width or merged), each
built and measured as cached steps like `invoke tune`'s, and deploy the smallest that keeps the eval accuracy and the
fidelity thresholds, then the fastest of those near its size — no keys to paste. The search table goes to
``proof/auto.{json,md}``; nothing qualifying means FP32, said so.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

from scripts.commands.layouts import auto_candidates, candidate_conversion, describe, SMALLEST
from scripts.commands.tune import run_tune
from scripts.commands.variants import prepare_model
from scripts.convert.exact_route import has_blocks
from scripts.core.errors import RecipeError
from scripts.recipe.precisions import AUTO
from scripts.recipe.spec import Recipe
from scripts.sources.gguf import KEPT_GGUF

log = logging.getLogger(__name__)
Announce = Callable[[str], None]


def resolve_auto(recipe: Recipe, announce: Announce = log.info, status=None) -> Recipe:
    """``conversion.precision == "auto"`` (recipe or ``--precision auto``) resolved by measuring the layouts; any other
    recipe is returned as it is."""
    if recipe.conversion.precision != AUTO:
        return recipe
    if recipe.source.random_weights:
        raise RecipeError(f"{recipe.path}: --precision auto needs meaningful answers, but {recipe.source} has random "
                          "weights. Pick a precision (int4/int8/fp32) for this size class.")
    if recipe.eval.dataset is None:
        raise RecipeError(f"{recipe.path}: --precision auto compares eval accuracy with FP32's; set eval.dataset, or "
                          "choose conversion.precision yourself.")
    main = prepare_model(recipe, announce, status)
    gguf_blocks = recipe.source.gguf_file and has_blocks(main.base_dir / KEPT_GGUF)
    candidates = auto_candidates(bool(gguf_blocks), main.adapter_dir is not None)
    announce(f"--precision auto: {len(candidates)} layouts to build and measure against FP32 (cached: a layout already "
             "measured is not measured again)…")
    report = run_tune(recipe, candidates, None, announce, status, SMALLEST)
    by_name = {c["name"]: c for c in candidates}
    for row in report["rows"]:
        announce(f"       {candidate_line(row, row['name'] == report['winner'])}")
    winner = report["winner"]
    if winner is None:
        announce(f"--precision auto: no layout keeps the eval accuracy and fidelity thresholds ({report['files']['md']}"
                 "): deploying FP32.")
        return replace(recipe, conversion=replace(recipe.conversion, precision="fp32"))
    row = next(r for r in report["rows"] if r["name"] == winner)
    announce(f"--precision auto chose {winner} ({describe(by_name[winner])}): {row['bytes'] / 1e6:.1f} MB, "
             f"{SMALLEST.rule.lower()}; table: {report['files']['md']}")
    return replace(recipe, conversion=candidate_conversion(recipe.conversion, by_name[winner]))


def candidate_line(row: dict, chosen: bool) -> str:
    """One searched layout in a line: size, eval accuracy, held-out fidelity, decode speed, verdict (pure)."""
    if row["status"] != "ok":
        return f"{row['name']}: failed: {row['reason'][:100]}"
    fid = row.get("fidelity") or {}
    figures = [f"{row['bytes'] / 1e6:.1f} MB"]
    if row.get("eval_accuracy") is not None:
        figures.append(f"eval {100 * row['eval_accuracy']:.1f} %")
    if fid:
        figures.append(f"top-1 {100 * fid['top1']:.1f} %, KLD {fid['kld_mean']:.4f}")
    if row.get("decode_tps"):
        figures.append(f"{row['decode_tps']:.0f} tok/s")
    verdict = "chosen" if chosen else ("qualifies" if row["qualifies"] else "; ".join(row["misses"]))
    return f"{row['name']}: {', '.join(figures)} — {verdict}"
