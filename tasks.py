"""SLMOps Deploy tasks. Each task parses flags, calls one function in ``scripts/`` and prints the result.
Domain errors (``scripts.errors.SlmopsError``) become ``Exit`` with their message."""
from __future__ import annotations

import functools
import logging
import os
import sys

from invoke import Exit, task

from scripts.errors import SlmopsError

RECIPE_HELP = "recipe name in recipes/ (e.g. qwen) or a path to a recipe .json"
MODEL_PATH_HELP = "deploy this Hugging Face model folder instead of the recipe's model.source"
FORCE_HELP = "rebuild every step even if its inputs did not change"


def _console():
    from rich.console import Console
    return Console(highlight=False)


def _setup_logging() -> None:
    from rich.logging import RichHandler
    level = os.environ.get("SLMOPS_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(show_path=False)], force=True)


def domain_errors(func):
    """Turn a domain error into a clean exit with its actionable message."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _setup_logging()
        try:
            return func(*args, **kwargs)
        except SlmopsError as exc:
            raise Exit(f"error: {exc}", code=exc.exit_code) from None

    return wrapper


def _pipeline(model, model_path=None, force=False):
    from scripts.pipeline import Pipeline
    from scripts.recipe import load_recipe
    console = _console()
    return console, Pipeline(load_recipe(model, model_path), force=force, announce=console.print)


@task
@domain_errors
def setup(c):
    """Install the pinned requirements into the current Python environment."""
    c.run(f"{sys.executable} -m pip install -r requirements.txt", pty=False)


@task
@domain_errors
def doctor(c):
    """Check Python, RAM, disk, CMake, Olive, ONNX Runtime (GenAI) and Foundry Local against the tested pins."""
    from scripts.doctor import run_doctor
    run_doctor(_console())


@task(help={"force": "retrain even if the dataset and settings did not change"})
@domain_errors
def demo_model(c, force=False):
    """Build (train) the bundled fine-tuned demo model, offline and seeded; cached until its inputs change."""
    console, pipeline = _pipeline("qwen", force=force)
    steps = {s.name: s for s in pipeline.steps()}
    pipeline.runner.run(steps["demo-model"])
    console.print(f"Demo model: {pipeline.model_dir}")


@task(help={"model": RECIPE_HELP, "model_path": MODEL_PATH_HELP, "force": FORCE_HELP})
@domain_errors
def convert(c, model="qwen", model_path=None, force=False):
    """Convert the recipe's model with Olive and render its Foundry package (no install)."""
    console, pipeline = _pipeline(model, model_path, force)
    with console.status("working…") as status:
        pipeline.status = status.update
        pipeline.run(until="package")
    console.print(f"Package ready: {pipeline.paths.package}")


@task(help={"model": RECIPE_HELP, "model_path": MODEL_PATH_HELP, "force": FORCE_HELP})
@domain_errors
def deploy(c, model="qwen", model_path=None, force=False):
    """Doctor → demo model → convert → render → install → check, skipping steps whose inputs did not change."""
    from scripts.pipeline import deploy as run_deploy
    from scripts.recipe import load_recipe
    from scripts.report import print_deploy_summary
    console = _console()
    recipe = load_recipe(model, model_path)
    with console.status("working…") as status:
        summary = run_deploy(recipe, force=force, announce=console.print, status=status.update)
    print_deploy_summary(console, summary)


@task(help={"model": RECIPE_HELP, "model_path": MODEL_PATH_HELP})
@domain_errors
def check(c, model="qwen", model_path=None):
    """Foundry checks on the installed model: listed, loads, answers (prints answer, load and generation time)."""
    from scripts.report import print_check
    console, pipeline = _pipeline(model, model_path)
    with console.status("working…") as status:
        pipeline.status = status.update
        result = pipeline.check()
    print_check(console, result)


@task(help={"model": RECIPE_HELP, "model_path": MODEL_PATH_HELP,
            "max_tokens": "longest reply, in tokens", "system": "optional system prompt"})
@domain_errors
def run(c, model="qwen", model_path=None, max_tokens=256, system=None):
    """Interactive streaming chat with the installed model through the Foundry Local runtime."""
    from scripts.chat import chat_loop
    console, pipeline = _pipeline(model, model_path)
    chat_loop(console, pipeline.cache_root, pipeline.installed_dir, pipeline.recipe.foundry.model_id,
              int(max_tokens), system)


@task
@domain_errors
def recipes(c):
    """List the recipes in recipes/."""
    from scripts.recipe import available_recipes
    for name in available_recipes():
        print(name)
