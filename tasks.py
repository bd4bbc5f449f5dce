"""SLMOps Deploy tasks. Each task parses flags, calls one function in ``scripts/`` and prints the result.
Domain errors (``scripts.core.errors.SlmopsError``) become ``Exit`` with their message."""
from __future__ import annotations

import functools
import inspect
import logging
import os
import sys

from invoke import Exit, task

from scripts.core.errors import SlmopsError
from scripts.recipe.precisions import TABLE_ORDER, refusal

RECIPE_HELP = "recipe name in recipes/ (e.g. qwen) or a path to a recipe .json"
MODEL_PATH_HELP = "deploy this Hugging Face model folder or .gguf file instead of the recipe's model.source"
FORCE_HELP = "rebuild every step even if its inputs did not change"
PRECISION_HELP = (f"{', '.join(p for p in TABLE_ORDER if not refusal(p))} instead of the recipe's conversion.precision "
                  f"({', '.join(p for p in TABLE_ORDER if refusal(p))} refused on CPU), or auto: build and measure "
                  "the layouts (INT8, INT4 layouts, a GGUF's blocks exact, the adapter as a branch or merged) and "
                  "deploy the smallest that keeps conversion.auto_threshold of FP32's eval accuracy and the fidelity "
                  "thresholds (proof/auto.md)")
NO_WAIT_HELP = ("when another command is using this recipe's build folder or its installed model, exit with code 75 "
                "naming it instead of waiting for it")
FAMILY_HELP = ("prompt-format family instead of the recipe's model.family: a name from `invoke families`, auto "
               "(detect), or auto-template (derive PromptTemplate from the tokenizer's chat template)")
#: The recipe a task works on when --model is not given.
DEFAULT_RECIPE = "qwen"
#: Help of the flags that tasks on one recipe share; :func:`recipe_task` gives each task those it takes.
SHARED_HELP = {"model": RECIPE_HELP, "model_path": MODEL_PATH_HELP, "force": FORCE_HELP, "family": FAMILY_HELP,
               "precision": PRECISION_HELP, "no_wait": NO_WAIT_HELP}


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


def recipe_task(**help):
    """``@task`` for a command on one recipe: the shared flags' help (those in :data:`SHARED_HELP` that the function
    takes) plus ``help`` for its own, and domain errors turned into clean exits."""

    def wrap(func):
        params = inspect.signature(func).parameters
        return task(help={**{k: v for k, v in SHARED_HELP.items() if k in params}, **help})(domain_errors(func))

    return wrap


def _recipe(console, model, model_path=None, family=None, precision=None, wait=True):
    """Load the recipe, apply the --family / --precision overrides and print any translation notes."""
    from scripts.families.select import override_family
    from scripts.pipeline import recipe_locked
    from scripts.recipe.load import load_recipe, with_precision
    from scripts.recipe.precisions import AUTO
    recipe = with_precision(override_family(load_recipe(model, model_path), family), precision)
    _print_notes(console, recipe)
    if recipe.conversion.precision == AUTO:  # measuring the candidates: the proof layer's job
        from scripts.commands.auto import resolve_auto
        with console.status("choosing the precision…") as status, recipe_locked(recipe, console.print, wait):
            recipe = resolve_auto(recipe, console.print, status.update)
    return recipe


def _pipeline(model, model_path=None, force=False, family=None, precision=None, wait=True):
    from scripts.pipeline import Pipeline
    console = _console()
    recipe = _recipe(console, model, model_path, family, precision, wait)
    return console, Pipeline(recipe, force=force, announce=console.print, wait=wait)


def _print_notes(console, recipe):
    for note in recipe.notes:
        console.print(f"[dim]note: {note}[/dim]")


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


@recipe_task(force="retrain even if the dataset and settings did not change")
def demo_model(c, force=False, no_wait=False):
    """Build (train) the bundled fine-tuned demo model, offline and seeded; cached until its inputs change."""
    console, pipeline = _pipeline(DEFAULT_RECIPE, force=force, wait=not no_wait)
    pipeline.run(only=("demo-model",))
    console.print(f"Demo model: {pipeline.model_dir}")


@recipe_task()
def convert(c, model=DEFAULT_RECIPE, model_path=None, force=False, family=None, precision=None, no_wait=False):
    """Convert the recipe's model with Olive and render its Foundry package (no install)."""
    console, pipeline = _pipeline(model, model_path, force, family, precision, not no_wait)
    with console.status("working…") as status:
        pipeline.status = status.update
        pipeline.run(until="package")
    console.print(f"Package ready: {pipeline.paths.package}")


@recipe_task(full="bench and validate with the full profile (more prompt lengths and repeats) instead of quick",
            skip_proof="skip bench, validate and the report (for fast iteration)",
            take_over="install even where another recipe installed a model with the same foundry.publisher/name")
def deploy(c, model=DEFAULT_RECIPE, model_path=None, force=False, full=False, skip_proof=False, family=None,
           precision=None, no_wait=False, take_over=False):
    """Doctor → demo model → convert → render → install → check → bench → validate → report (unchanged steps skipped)."""
    from scripts.commands.deploy import deploy as run_deploy
    from scripts.commands.console import print_deploy_summary
    console = _console()
    recipe = _recipe(console, model, model_path, family, precision, not no_wait)
    with console.status("working…") as status:
        summary = run_deploy(recipe, force=force, announce=console.print, status=status.update,
                             proof=None if skip_proof else ("full" if full else "quick"), wait=not no_wait,
                             take_over=take_over)
    print_deploy_summary(console, summary)


@recipe_task()
def check(c, model=DEFAULT_RECIPE, model_path=None, no_wait=False):
    """Foundry checks on the installed model: listed, loads, answers (prints answer, load and generation time)."""
    from scripts.commands.console import print_check
    console, pipeline = _pipeline(model, model_path, wait=not no_wait)
    with console.status("working…") as status:
        pipeline.status = status.update
        result = pipeline.check()
    print_check(console, result)


@recipe_task(max_tokens="longest reply, in tokens (sized down to what the model's context leaves)",
            system="optional system message (/system changes it during the chat)")
def run(c, model=DEFAULT_RECIPE, model_path=None, max_tokens=256, system=None, no_wait=False):
    """Interactive streaming chat with the installed model through Foundry Local (/help lists the chat commands).

    With ``eval.tools`` in the recipe, that set's tools are offered in every prompt and calls are shown readably."""
    from scripts.runtimes.chat import run_chat
    console, pipeline = _pipeline(model, model_path, wait=not no_wait)
    with pipeline.cache_locked(read_only=True):  # recovers a killed install or rollback before reading the version
        model_id = pipeline.model_id
        pipeline.verify_installed(deep=False)  # sizes and mtimes (check hashes everything)
    run_chat(console, pipeline.cache_root, pipeline.installed_dir, model_id,
             int(max_tokens), system, lock=lambda: pipeline.cache_locked(read_only=True), tools=pipeline.chat_tools())


def _port(value, default: int) -> int:
    from scripts.core.errors import ServeError
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ServeError(f"--port must be an integer, got {value!r}.") from None


@recipe_task(host="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the endpoint, "
                    "which has no authentication, to the network)",
            port="port to listen on (default 5272; with --check a free one; 0 picks a free one)",
            check="start the server, ask it the eval questions through the openai client (streamed and not), "
                     "print accuracy, TTFT and tokens/s over HTTP beside the in-process figures, stop it")
def serve(c, model=DEFAULT_RECIPE, model_path=None, host="127.0.0.1", port=None, check=False):
    """Serve the installed model as an OpenAI-compatible endpoint (http://HOST:PORT/v1) through Foundry Local."""
    console, pipeline = _pipeline(model, model_path)
    if check:
        from scripts.commands.console import print_serve_check
        from scripts.core.errors import QualityError
        from scripts.commands.serve_check import failure_message, serve_check
        with console.status("working…") as status:
            result = serve_check(pipeline, host, _port(port, 0), status.update)
        print_serve_check(console, result)
        failure = failure_message(result, pipeline.recipe.eval.min_accuracy)
        if failure:
            raise QualityError(failure)
        return
    from scripts.serve.server import plan_serve, run_server
    from scripts.serve.api import DEFAULT_PORT
    with pipeline.cache_locked(read_only=True):  # recovers a killed install or rollback before reading the version
        model_id = pipeline.model_id
        pipeline.verify_installed(deep=False)  # sizes and mtimes (check hashes everything)
    plan = plan_serve(pipeline.cache_root, pipeline.installed_dir, model_id, host,
                      _port(port, DEFAULT_PORT))
    console.print(f"Starting {plan.model_id} (Foundry Local) on {host}:{plan.port}…")
    result = run_server(plan, lambda line: console.print(line, soft_wrap=True, markup=False))  # copy-pasteable lines
    console.print(f"Stopped ({result.get('stopped_by', 'exited')}).")


@task
@domain_errors
def models(c):
    """List the installed models and their kept versions (recipe, precision, size, content hash, time, proof)."""
    from scripts.commands.models import models_lines
    from scripts.runtimes.foundry import cache_root
    for line in models_lines(cache_root()):
        print(line)


@recipe_task(to="the kept version to make current (default: the one before the current)")
def rollback(c, model=DEFAULT_RECIPE, to=None, no_wait=False):
    """Make an earlier installed version of the recipe's model current, atomically (`invoke models` lists them)."""
    from scripts.commands.models import rollback as run_rollback
    console, pipeline = _pipeline(model, wait=not no_wait)
    manifest = run_rollback(pipeline, to)
    console.print(f"Current: {pipeline.recipe.foundry.publisher}/{manifest['model_id']} (check, run and serve use it; "
                  "a running serve keeps its version and says so)")


@task
@domain_errors
def families(c):
    """List the registered model families (prompt formats), the architectures each covers and its stop tokens."""
    from rich.markup import escape

    from scripts.commands.console import print_rows
    from scripts.families.select import family_notes, family_rows
    rows = family_rows()
    console = _console()
    print_rows(console, "Model families (templates/families/)", list(rows[0]), [list(r.values()) for r in rows])
    for note in family_notes():
        console.print(escape(note))


@task
@domain_errors
def recipes(c):
    """List the recipes in recipes/."""
    from scripts.recipe.load import available_recipes
    for name in available_recipes():
        print(name)


@task
@domain_errors
def docs(c):
    """Regenerate the generated docs pages: docs/recipe.md (every recipe key) from the recipe schema."""
    from scripts.recipe.keys_doc import write
    print(f"Wrote {write()}")


PROFILE_HELP = ("measurement profile: quick (3 prompt lengths, 1 warm-up + 3 runs), full (5 lengths, 2 + 5 runs), "
                "scale (prompts of 128, 512 and 2,000 tokens, 128 new tokens, 2 + 3 runs) or long (128, 2,000 and "
                "8,192 tokens or the context's limit, 1 + 2 runs, Foundry Local and raw GenAI, llama.cpp Q4_0)")


def _proof(model, model_path, profile, measure_and_save, printer, name, wait=True):
    """Run one proof (bench or validate) on the installed model, print it, refresh the report; return the result."""
    from scripts.proof.measure import get_profile
    from scripts.proof.run import proof_dir, write_report
    console, pipeline = _pipeline(model, model_path, wait=wait)
    with console.status("working…") as status, pipeline.locked(), pipeline.cache_locked():
        result = measure_and_save(pipeline, get_profile(profile), status.update)
        printer(console, result)
        write_report(pipeline)
    console.print(f"Saved {proof_dir(pipeline) / f'{name}.json'} and {name}.md")
    return result


PEER_HELP = ("also measure a peer runtime on the same weights, prompts and thread count, in the same table with "
             "ours ÷ peer ratios: llama.cpp (GGUF F32 → Q4_0 and Q4_K_M built from the recipe's Hugging Face "
             "folder; needs the optional `pip install -r requirements-peer.txt`)")


@recipe_task(profile=PROFILE_HELP, peer=PEER_HELP,
            fp32="also measure the same model's FP32 ONNX build through raw GenAI (built, or reused, where "
                    "`invoke compare` builds it: build/<recipe>/precisions/fp32/)",
            rounds="measure every backend this many times, interleaved (each once per round), and pool the runs: "
                      "on shared cores a load change then hits every backend alike (default 1)")
def bench(c, model=DEFAULT_RECIPE, model_path=None, profile="quick", peer=None, fp32=False, rounds=1, no_wait=False):
    """Speed and memory of the installed model: Foundry Local vs raw ONNX Runtime GenAI vs PyTorch (vs a peer), vs the bandwidth bound."""
    from scripts.proof.run import bench_and_save
    from scripts.commands.console import print_bench
    from scripts.commands.compare import fp32_bench_run
    measure = functools.partial(bench_and_save, peer=peer, extra=[fp32_bench_run] if fp32 else [], rounds=int(rounds))
    _proof(model, model_path, profile, measure, print_bench, "bench", not no_wait)


@recipe_task(profile=PROFILE_HELP,
            threads="intra_op_num_threads variants to compare, comma-separated: default (ONNX Runtime's choice) "
                       "or a number, e.g. default,1,2",
            rounds="interleaved rounds (each variant measured once per round)",
            foundry="also measure through the Foundry Local runtime (raw ONNX Runtime GenAI always)",
            peer="also measure this peer (llama.cpp) at each thread count, interleaved, with ours ÷ peer ratios")
def bench_threads(c, model=DEFAULT_RECIPE, model_path=None, profile="quick", threads="default,1,2", rounds=3,
                  foundry=False, peer=None):
    """What ONNX Runtime's intra-op thread count moves on the installed model: interleaved A/B, proof/threads.{json,md}."""
    from scripts.commands.console import print_markdown
    from scripts.proof.measure import get_profile
    from scripts.proof.run import proof_dir, threads_ab_and_save
    from scripts.proof.threads_ab import parse_variants, threads_markdown
    console, pipeline = _pipeline(model, model_path)
    with console.status("working…") as status:
        data = threads_ab_and_save(pipeline, get_profile(profile), parse_variants(threads), int(rounds),
                                   ("genai", "foundry") if foundry else ("genai",), status.update, peer)
    print_markdown(console, threads_markdown(data))
    console.print(f"Saved {proof_dir(pipeline) / 'threads.json'} and threads.md")


@recipe_task(prompt_tokens="prompt length in tokens (the bench's filler text in the model's chat template)",
            new_tokens="tokens to generate after the prompt (the decode steps profiled)")
def profile(c, model=DEFAULT_RECIPE, model_path=None, prompt_tokens=128, new_tokens=16):
    """Per-operator time of one generation in ONNX Runtime's profiler (prefill and decode), proof/profile.{json,md}."""
    from scripts.commands.console import print_markdown
    from scripts.proof.run import profile_and_save, proof_dir
    from scripts.proof.profile import profile_markdown
    console, pipeline = _pipeline(model, model_path)
    with console.status("profiling…"):
        data = profile_and_save(pipeline, int(prompt_tokens), int(new_tokens))
    print_markdown(console, profile_markdown(data))
    console.print(f"Saved {proof_dir(pipeline) / 'profile.json'} and profile.md")


@recipe_task(profile=PROFILE_HELP)
def validate(c, model=DEFAULT_RECIPE, model_path=None, profile="quick", no_wait=False):
    """The deployment checklist, measured through Foundry Local; non-zero exit when an item fails."""
    from scripts.core.errors import QualityError
    from scripts.proof.run import failure_message, validate_and_save
    from scripts.commands.console import print_validate
    report = _proof(model, model_path, profile, validate_and_save, print_validate, "validate", not no_wait)
    if not report.passed:
        raise QualityError(failure_message(report))


@recipe_task()
def report(c, model=DEFAULT_RECIPE, model_path=None):
    """Write report.md and a self-contained report.html (plots) from the last bench, validate and compare results."""
    from scripts.proof.run import write_report
    console, pipeline = _pipeline(model, model_path)
    with pipeline.locked():
        md, html = write_report(pipeline)
    console.print(f"Report: {md}\n        {html}")


@recipe_task(precisions=f"comma-separated subset of {','.join(TABLE_ORDER)} (default: all)")
def compare(c, model=DEFAULT_RECIPE, model_path=None, precisions=",".join(TABLE_ORDER), family=None, no_wait=False):
    """Build every precision (cached) and measure size, speed and quality side by side: the tutorial's table, measured."""
    from scripts.pipeline import recipe_locked
    from scripts.commands.compare import run_compare
    from scripts.families.select import override_family
    from scripts.recipe.load import load_recipe
    from scripts.commands.console import print_compare
    console = _console()
    recipe = override_family(load_recipe(model, model_path), family)
    _print_notes(console, recipe)
    with console.status("working…") as status, recipe_locked(recipe, console.print, not no_wait):
        report = run_compare(recipe, [p.strip() for p in precisions.split(",") if p.strip()],
                             announce=console.print, status=status.update)
    print_compare(console, report)


@recipe_task(candidates="a JSON list of candidates ({\"name\": ..., <conversion.quantization keys, precision, gguf, "
                          "adapter, adapter_bits>}); default: the built-in grid (scripts/commands/layouts.py GRID)",
            max_size_ratio="largest size allowed, as a fraction of the FP32 ONNX build (default 0.25)")
def tune(c, model=DEFAULT_RECIPE, model_path=None, candidates=None, max_size_ratio="0.25", family=None,
         no_wait=False):
    """Search layouts (block size, symmetry, 8-bit weight groups, how a GGUF or an adapter is carried) for the fastest
    that keeps the recipe's eval accuracy and fidelity thresholds, measured through Foundry Local; prints the winner's
    recipe keys (`--precision auto` searches and deploys the smallest instead)."""
    from scripts.pipeline import recipe_locked
    from scripts.commands.tune import load_candidates, run_tune
    from scripts.families.select import override_family
    from scripts.recipe.load import load_recipe
    from scripts.commands.console import print_tune
    console = _console()
    recipe = override_family(load_recipe(model, model_path), family)
    from scripts.core.errors import RecipeError
    try:
        ratio = float(max_size_ratio)
    except ValueError:
        ratio = -1.0
    if not 0 < ratio <= 1:
        raise RecipeError(f"--max-size-ratio {max_size_ratio!r}: give a fraction of the FP32 size, e.g. 0.25.")
    grid = load_candidates(candidates)
    _print_notes(console, recipe)
    with console.status("working…") as status, recipe_locked(recipe, console.print, not no_wait):
        report = run_tune(recipe, grid, ratio, announce=console.print, status=status.update)
    print_tune(console, report)
