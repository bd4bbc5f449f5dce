"""Every registered family deploys end to end on a tiny model of its own (real Olive conversion, real Foundry Local
runtime, token-by-token template verification); a template that disagrees with its tokenizer fails with a diff; a
tokenizer with two different chat templates is refused before conversion; an unregistered architecture gets the
clear error, and deploys with ``--family auto-template``.

Cost: one Olive conversion per deploy (~30 s each, mostly start-up), so every deploy runs once, up front, in a
session fixture, two at a time (each with its own build folder and Foundry cache); the tests only read the results.
The chain is doctor → convert → package → install → check (``Pipeline.run``): bench/validate are not part of it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from scripts.families.registry import family_names, get_family

REPO = Path(__file__).resolve().parent.parent
UNREGISTERED = "OlmoForCausalLM"  # converts with the pinned builder, but no family claims it
PARALLEL = 2  # deploys at a time: Olive start-up is one busy core per deploy

_BUILD_ALL = textwrap.dedent('''
    import sys
    from pathlib import Path
    from scripts.sources.tiny import build_tiny_model
    root = Path(sys.argv[1])
    for name in sys.argv[2:]:
        build_tiny_model(name, root / name)
    build_tiny_model("chatml", root / "unregistered", architecture="%s")
''' % UNREGISTERED)

_DEPLOY = textwrap.dedent('''
    import json, sys
    from scripts.core.errors import SlmopsError
    from scripts.families.select import override_family
    from scripts.pipeline import Pipeline
    from scripts.recipe.load import load_recipe
    try:
        r = override_family(load_recipe(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
        out = Pipeline(r, announce=print).run()
        print("CHECK", json.dumps(out["check"].result))
    except SlmopsError as exc:
        print("error:", exc, file=sys.stderr)
        sys.exit(1)
''')


def _env(root: Path, cache: Path) -> dict[str, str]:
    return dict(os.environ, SLMOPS_BUILD_DIR=str(root / "build"), SLMOPS_FOUNDRY_CACHE=str(cache),
                SLMOPS_RECIPES_DIR=str(root / "recipes"), HOME=str(root / "home"),
                XDG_CACHE_HOME=str(root / "home/.cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", COLUMNS="200")


def write_recipe(root: Path, name: str, model_dir: Path, family: str = "auto") -> None:
    recipe = {"description": f"tiny {name}", "model": {"source": str(model_dir), "family": family},
              "foundry": {"publisher": "fam", "name": f"tiny-{name}", "version": "1"},
              "generation": {"max_length": 128}}
    (root / "recipes" / f"{name}.json").write_text(json.dumps(recipe, indent=2))


def deploy(root: Path, recipe: str, *extra: str) -> subprocess.CompletedProcess:
    """The deploy chain for ``recipe`` in its own process, with its own Foundry cache (``cache/<recipe>``)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _DEPLOY, recipe, *extra], cwd=REPO,
                          env=_env(root, root / "cache" / recipe), capture_output=True, text=True, timeout=900)
    proc.seconds = time.perf_counter() - start  # type: ignore[attr-defined]
    return proc


def _with_template(models: Path, name: str, template: str) -> Path:
    """The tiny ChatML model with another chat template (tokenizer_config.json and chat_template.jinja alike)."""
    folder = models / name
    shutil.copytree(models / "chatml", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(template)  # the same text: transformers 5 reads this file first
    return folder


def _default_system(models: Path) -> Path:
    """A Qwen2.5-style template that injects a default system prompt when none is given."""
    return _with_template(models, "qwen-default-system", (
        "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}"
        "{%- endif %}" + get_family("chatml").reference_chat_template))


def _mismatched_chatml(models: Path) -> Path:
    """ChatML markers, but a space instead of the newline after the role: not what the chatml family prompts."""
    return _with_template(models, "chatml-space", get_family("chatml").reference_chat_template.replace(
        "message['role'] + '\\n'", "message['role'] + ' '"))


def _two_templates(models: Path) -> Path:
    """The tiny ChatML model whose chat_template.jinja differs from tokenizer_config.json's template."""
    folder = models / "two-templates"
    shutil.copytree(models / "chatml", folder)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    return folder


@pytest.fixture(scope="session")
def deployed(tmp_path_factory) -> dict:
    """Tiny models (one process builds them all), then every deploy, ``PARALLEL`` at a time. Returns
    ``{"root": Path, "runs": {job: [CompletedProcess, ...]}}``; seconds per run in ``<root>/timings.json``."""
    root = tmp_path_factory.mktemp("families")
    models = root / "models"
    (root / "recipes").mkdir()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _BUILD_ALL, str(models), *family_names()], cwd=REPO,
                          env=_env(root, root / "cache"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    build_seconds = time.perf_counter() - start
    for name in family_names():
        write_recipe(root, name, models / name)
    write_recipe(root, "unregistered", models / "unregistered")
    write_recipe(root, "mismatch", _mismatched_chatml(models), family="chatml")
    write_recipe(root, "default-system", _default_system(models))
    write_recipe(root, "two-templates", _two_templates(models), family="chatml")
    jobs = {
        # detected by its template's markers, then auto-template deploys (reusing the conversion)
        "unregistered": lambda: [deploy(root, "unregistered"), deploy(root, "unregistered", "auto-template")],
        "mismatch": lambda: [deploy(root, "mismatch")],
        "default-system": lambda: [deploy(root, "default-system")],
        "two-templates": lambda: [deploy(root, "two-templates")],
        **{name: (lambda name=name: [deploy(root, name)]) for name in family_names()},
    }
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        futures = {job: pool.submit(run) for job, run in jobs.items()}
        runs = {job: future.result() for job, future in futures.items()}
    (root / "timings.json").write_text(json.dumps(  # to keep an eye on this file's cost
        {"tiny models": build_seconds, **{job: [round(p.seconds, 1) for p in procs] for job, procs in runs.items()}}))
    return {"root": root, "runs": runs}


def _output(proc) -> str:
    return proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("family", family_names())
def test_family_deploys_through_foundry(deployed, family):
    proc, = deployed["runs"][family]
    assert proc.returncode == 0, _output(proc)
    assert f"family: {family} (detected from" in proc.stdout
    assert "PromptTemplate matches the tokenizer's chat template token by token" in proc.stdout
    check = json.loads(proc.stdout.split("CHECK ", 1)[1].splitlines()[0])
    assert check["listed"] is True and check["model_id"] == f"tiny-{family}:1"
    installed = deployed["root"] / "cache" / family / "fam" / f"tiny-{family}"
    info = json.loads((installed / "inference_model.json").read_text())
    assert info["PromptTemplate"]["prompt"].count("{Content}") == 1
    genai = json.loads((installed / "genai_config.json").read_text())
    tokens = json.loads((installed / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokens["added_tokens"]}
    eos = genai["model"]["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    assert all(ids[t] in eos for t in get_family(family).stop_tokens if t in ids)
    assert genai["search"]["max_length"] == 128  # the recipe's own value wins over family defaults


def test_template_that_disagrees_with_its_tokenizer_fails_with_a_diff(deployed):
    proc, = deployed["runs"]["mismatch"]
    assert proc.returncode == 1, _output(proc)
    assert "PromptTemplate and the tokenizer's chat template render different prompts" in proc.stderr
    assert "-<|im_start|>user When does" in proc.stderr and "+<|im_start|>user" in proc.stderr
    assert "first different token at position" in proc.stderr
    assert not (deployed["root"] / "cache" / "mismatch" / "fam" / "tiny-mismatch").exists()  # nothing installed


def test_default_system_prompt_is_carried_and_deploys_with_auto(deployed):
    proc, = deployed["runs"]["default-system"]
    assert proc.returncode == 0, _output(proc)
    assert "family: chatml (detected from Qwen2ForCausalLM" in proc.stdout
    assert "injects a default system prompt when none is given, carried into PromptTemplate" in proc.stdout
    assert "PromptTemplate matches the tokenizer's chat template token by token (user only" in proc.stdout
    info = json.loads((deployed["root"] / "cache" / "default-system" / "fam" / "tiny-default-system" /
                       "inference_model.json").read_text())
    assert info["PromptTemplate"]["prompt"] == ("<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\n"
                                                "{Content}<|im_end|>\n<|im_start|>assistant\n")


def test_two_different_chat_templates_are_refused_before_conversion(deployed):
    proc, = deployed["runs"]["two-templates"]
    assert proc.returncode == 1, _output(proc)
    assert "the tokenizer has two different chat templates" in proc.stderr
    assert "Foundry Local applies tokenizer_config.json's" in proc.stderr
    assert "▶ convert" in proc.stdout and "✓ convert" not in proc.stdout  # refused before Olive ran


def test_unregistered_architecture_is_detected_by_its_template_and_auto_template_deploys(deployed):
    auto, derived = deployed["runs"]["unregistered"]
    assert auto.returncode == 0, _output(auto)
    assert "family: chatml (detected from the tokenizer's chat template: its markers" in auto.stdout
    assert f"{UNREGISTERED} is not registered with a family" in auto.stdout
    assert derived.returncode == 0, _output(derived)
    assert "family: auto-template (PromptTemplate derived from the tokenizer's own chat template" in derived.stdout
    info = json.loads((deployed["root"] / "cache" / "unregistered" / "fam" / "tiny-unregistered" /
                       "inference_model.json").read_text())
    assert info["PromptTemplate"]["prompt"] == "<|im_start|>user\n{Content}<|im_end|>\n<|im_start|>assistant\n"
