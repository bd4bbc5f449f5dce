"""Variant builds of one recipe (other precisions or quantization layouts, each in its own root under
``build/<recipe>/``), converting the model the recipe's own steps made: what ``compare`` and ``tune`` build."""
from __future__ import annotations

from dataclasses import replace

from scripts.pipeline import Announce, Pipeline
from scripts.recipe.spec import Recipe


def variant_pipeline(recipe: Recipe, conversion, folder: str, announce: Announce, status=None) -> Pipeline:
    """A pipeline for ``recipe`` converted with ``conversion``, building in ``build/<recipe>/<folder>/``."""
    return Pipeline.variant(recipe, conversion, folder, announce=announce, status=status)


def precision_pipeline(recipe: Recipe, precision: str, announce: Announce, status=None):
    """A pipeline for ``recipe`` at ``precision`` building in ``build/<recipe>/precisions/<precision>/`` (FP32: the
    reference build, float cache, the one the fidelity gate measures against)."""
    conversion = (recipe.conversion.reference() if precision == "fp32"
                  else replace(recipe.conversion, precision=precision))
    return variant_pipeline(recipe, conversion, f"precisions/{precision}", announce, status)


def build_package(pipe: Pipeline) -> None:
    """Convert and package ``pipe``'s model (cached steps, graph-checked, smoke-tested) under its lock: the recipe's
    (held by the caller: re-entered) and recovery of its build folder. Raises what the steps raise."""
    pipe.run(only=("convert", "package"))


def prepare_model(recipe: Recipe, announce: Announce, status=None):
    """Run the steps that produce the model to convert (demo/synthetic model, fine-tune, adapter merge); return the
    pipeline."""
    main = Pipeline(recipe, announce=announce, status=status)
    main.run(only=main.model_steps())
    return main
