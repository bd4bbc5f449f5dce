"""The reliability suite (issue 11), with the real tools (Olive, the Foundry Local runtime) in temporary build, cache
and recipe folders:

- fault injection: `invoke deploy` is SIGKILLed by itself at every step boundary of convert and install
  (``SLMOPS_TEST_KILL_AT``, :mod:`scripts.core.faults`), also on a filesystem without RENAME_EXCHANGE
  (``SLMOPS_TEST_NO_EXCHANGE``); right after the kill the cache holds the old or the new model, whole, and the next
  command (`invoke check`) recovers what was left, says so, and loads and answers through Foundry Local;
- concurrency: a second deploy waits with a message or, with ``--no-wait``, is refused naming the first; a command
  needing the cache target waits for an install (``SLMOPS_TEST_PAUSE_AT`` holds the first at a marked point; every
  hand-over is a line on a pipe, never a sleep);
- bad inputs, each with its message: an unsupported architecture (refused before Olive), an Olive workflow file
  given as a recipe (translated, or refused naming the supported form), a default Foundry SDK client against a
  512-token model.

The interactive chat's reliability is in ``tests/runtimes/test_chat.py``. Tests that run Olive more than once are
marked slow.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from scripts.convert.install import REQUIRED, list_cache
from scripts.core.faults import KILL_ENV, NO_EXCHANGE_ENV, PAUSE_ENV, PAUSE_FIFO_ENV
from scripts.core.fileops import hash_path
from scripts.recipe.olive_workflow import SUPPORTED_FORM
from tests.sandbox import INVOKE, invoke, make_sandbox, REPO

KILLED = -9
LEFTOVER = re.compile(r"^\..+\.(staging|old)-[0-9a-f]{8}$")


def recipe(model_dir: Path, name: str = "tiny-rel", max_length: int = 256) -> dict:
    return {"model": {"source": str(model_dir), "family": "auto"},
            "foundry": {"publisher": "rel", "name": name}, "generation": {"max_length": max_length}}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_hf_model):
    box = make_sandbox(tmp_path_factory.mktemp("reliability"), "rel/tiny-rel", tiny_hf_model)
    (box["recipes"] / "tiny.json").write_text(json.dumps(recipe(tiny_hf_model)))
    return box


def start(sandbox, *args, **env) -> subprocess.Popen:
    return subprocess.Popen(INVOKE + list(args), cwd=REPO, env={**sandbox["env"], **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def line_with(stream, marker: str) -> str:
    """Read ``stream`` up to the line holding ``marker`` (the process's next move is synchronised on it)."""
    for line in stream:
        if marker in line:
            return line
    raise AssertionError(f"the process ended before printing {marker!r}")


def pause_env(sandbox, point: str) -> dict:
    fifo = sandbox["root"] / f"pause-{point.replace(':', '-')}.fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    return {PAUSE_ENV: point, PAUSE_FIFO_ENV: str(fifo)}


def release(pause: dict) -> None:
    with open(pause[PAUSE_FIFO_ENV], "wb"):
        pass


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if LEFTOVER.match(p.name)) if folder.is_dir() else []


def installed_max_length(sandbox) -> int:
    return json.loads((sandbox["installed"] / "genai_config.json").read_text())["search"]["max_length"]


def whole(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in REQUIRED + ("model.onnx.data", "tokenizer.json"))


def visible(sandbox) -> list[str]:
    """Folders the Foundry cache scanner lists under the model's name."""
    return [m["path"] for m in list_cache(sandbox["cache"]) if m["name"] == "tiny-rel"]


def set_max_length(sandbox, value: int) -> None:
    (sandbox["recipes"] / "tiny.json").write_text(json.dumps(recipe(sandbox["hf"], max_length=value)))


def check_recovers_and_answers(sandbox, *expected_notes: str) -> subprocess.CompletedProcess:
    proc = invoke(sandbox, "check", "--model", "tiny")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for note in expected_notes:
        assert note in proc.stdout, proc.stdout
    assert "│ listed          │ yes" in proc.stdout and "│ answer" in proc.stdout
    assert leftovers(sandbox["installed"].parent) == []
    assert visible(sandbox) == [str(sandbox["installed"])]
    return proc


@pytest.fixture(scope="module")
def deployed(sandbox):
    proc = invoke(sandbox, "deploy", "--model", "tiny", "--skip-proof")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


# ----- fault injection: install ---------------------------------------------------------------------------------
# (point, without RENAME_EXCHANGE, the installed model right after the kill: "old" / "new" / None (missing),
#  what the next command says it recovered)
INSTALL_KILLS = [
    ("step:install:start", False, "old", []),
    ("install:staged", False, "old", ["recovered: removed", ".tiny-rel.staging-"]),
    ("install:swapped", False, "new", ["recovered: removed", ".tiny-rel.staging-"]),
    ("step:install:ran", False, "new", []),
    ("install:staged", True, "old", ["recovered: removed", ".tiny-rel.staging-"]),
    ("install:old-moved", True, None, ["recovered: restored", "from .tiny-rel.old-", "recovered: removed"]),
    ("install:swapped", True, "new", ["recovered: removed", ".tiny-rel.old-"]),
]


@pytest.mark.parametrize("point, no_exchange, after_kill, notes", INSTALL_KILLS,
                         ids=[f"{p}{'-no-exchange' if n else ''}" for p, n, _, _ in INSTALL_KILLS])
def test_a_kill_during_install_leaves_a_whole_model_and_the_next_command_recovers(sandbox, deployed, point,
                                                                                  no_exchange, after_kill, notes):
    old = installed_max_length(sandbox)
    new = 200 if old == 256 else 256
    set_max_length(sandbox, new)  # package and install rerun, nothing else
    env = {KILL_ENV: point, **({NO_EXCHANGE_ENV: "1"} if no_exchange else {})}
    killed = invoke(sandbox, "deploy", "--model", "tiny", "--skip-proof", **env)
    assert killed.returncode == KILLED, killed.stdout + killed.stderr
    assert "▶ install" in killed.stdout

    # The instant after the kill: what a user or the runtime finds in the cache.
    if after_kill is None:  # two renames: the one window without the model (documented), until recovery
        assert not sandbox["installed"].exists() and leftovers(sandbox["installed"].parent)
    else:
        assert whole(sandbox["installed"]) and installed_max_length(sandbox) == (old if after_kill == "old" else new)
        assert visible(sandbox) == [str(sandbox["installed"])], "leftovers stay hidden from the cache scanner"

    check_recovers_and_answers(sandbox, "taking over the lock of", "which ended without releasing it", *notes)
    assert installed_max_length(sandbox) == (new if after_kill == "new" else old)


def test_after_install_kills_the_next_deploy_completes(sandbox, deployed):
    proc = invoke(sandbox, "deploy", "--model", "tiny", "--skip-proof")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert installed_max_length(sandbox) == json.loads((sandbox["recipes"] / "tiny.json").read_text())[
        "generation"]["max_length"]
    assert leftovers(sandbox["installed"].parent) == [] and visible(sandbox) == [str(sandbox["installed"])]


# ----- fault injection: convert ---------------------------------------------------------------------------------
CONVERT_KILLS = [pytest.param("step:convert:start", id="step:convert:start")] + [
    pytest.param(p, id=p, marks=pytest.mark.slow)
    for p in ("convert:olive-running", "convert:olive-done", "convert:staged", "convert:swapped", "step:convert:ran")]


@pytest.mark.parametrize("point", CONVERT_KILLS)
def test_a_kill_during_convert_leaves_the_installed_model_loadable(sandbox, deployed, point):
    before = hash_path(sandbox["installed"])
    killed = start(sandbox, "deploy", "--model", "tiny", "--force", "--skip-proof", **{KILL_ENV: point})
    out, err = killed.communicate(timeout=900)
    assert killed.returncode == KILLED, out + err
    olive = [p for p in psutil.process_iter(["cmdline"])
             if str(sandbox["build"]) in " ".join(p.info["cmdline"] or []) and "olive" in " ".join(p.info["cmdline"])]
    gone, alive = psutil.wait_procs(olive, timeout=10)  # killed with its parent: gone at once (a run takes > 15 s)
    assert not alive, "an Olive child outlived the killed deploy"
    if point == "convert:olive-running":
        staging = [p for p in (sandbox["build"] / "tiny").glob(".onnx.staging-*")]
        assert staging and not any((p / "model.onnx").exists() for p in staging), "Olive stopped before finishing"
    assert hash_path(sandbox["installed"]) == before
    if point in ("convert:olive-running", "convert:olive-done", "convert:staged"):
        assert leftovers(sandbox["build"] / "tiny"), "the killed convert left its staging folder"
    check_recovers_and_answers(sandbox)


@pytest.mark.slow
def test_after_convert_kills_the_next_deploy_recovers_the_build_folder_and_completes(sandbox, deployed):
    killed = invoke(sandbox, "deploy", "--model", "tiny", "--force", "--skip-proof", **{KILL_ENV: "convert:staged"})
    assert killed.returncode == KILLED
    proc = invoke(sandbox, "deploy", "--model", "tiny", "--force", "--skip-proof")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "recovered: removed" in proc.stdout and ".onnx.staging-" in proc.stdout
    assert "emptied Olive's cache" in proc.stdout
    assert leftovers(sandbox["build"] / "tiny") == [] and leftovers(sandbox["installed"].parent) == []


# ----- concurrency --------------------------------------------------------------------------------------------
def test_a_second_deploy_waits_or_with_no_wait_is_refused(sandbox, deployed):
    (sandbox["build"] / "tiny" / "stamps" / "install.json").unlink()  # the first deploy has real work: install
    pause = pause_env(sandbox, "pipeline:locked")
    first = start(sandbox, "deploy", "--model", "tiny", "--skip-proof", **pause)
    try:
        assert f"paused at pipeline:locked (pid {first.pid})" in line_with(first.stderr, "slmops-test:")
        refused = invoke(sandbox, "deploy", "--model", "tiny", "--skip-proof", "--no-wait")
        assert refused.returncode == 75, refused.stdout + refused.stderr
        assert (f"{sandbox['build'] / 'tiny'} is in use by pid {first.pid} (`invoke deploy --model tiny --skip-proof`"
                ", building recipe tiny, since ") in refused.stderr
        second = start(sandbox, "deploy", "--model", "tiny", "--skip-proof")
        assert f"waiting for pid {first.pid}" in line_with(second.stdout, "waiting for")
        release(pause)
        out1, err1 = first.communicate(timeout=900)
        out2, err2 = second.communicate(timeout=900)
    finally:
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert "▶ install" in out1
    assert "▶" not in out2, "the second deploy shares nothing with the first: it finds its work done"


def test_a_command_on_the_cache_target_waits_for_a_running_install(sandbox, deployed):
    (sandbox["build"] / "tiny" / "stamps" / "install.json").unlink()
    pause = pause_env(sandbox, "step:install:start")
    first = start(sandbox, "deploy", "--model", "tiny", "--skip-proof", **pause)
    try:
        line_with(first.stderr, "paused at step:install:start")
        refused = invoke(sandbox, "check", "--model", "tiny", "--no-wait")
        assert refused.returncode == 75
        assert (f"{sandbox['installed']} is in use by pid {first.pid} (`invoke deploy --model tiny --skip-proof`, "
                "installing or loading tiny-rel:1") in refused.stderr
        second = start(sandbox, "check", "--model", "tiny")
        line_with(second.stdout, f"waiting for pid {first.pid}")
        release(pause)
        assert first.wait(timeout=900) == 0
        out2, err2 = second.communicate(timeout=900)
    finally:
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert second.returncode == 0, err2
    assert "listed          │ yes" in out2


@pytest.mark.slow
def test_two_forced_deploys_at_once_run_one_after_the_other(sandbox, deployed):
    """The issue's case: two `deploy --force` of one recipe no longer share build/<recipe>/olive."""
    pause = pause_env(sandbox, "pipeline:locked")
    first = start(sandbox, "deploy", "--model", "tiny", "--force", "--skip-proof", **pause)
    line_with(first.stderr, "paused at pipeline:locked")
    second = start(sandbox, "deploy", "--model", "tiny", "--force", "--skip-proof")
    line_with(second.stdout, f"waiting for pid {first.pid}")
    release(pause)
    out1, err1 = first.communicate(timeout=900)
    out2, err2 = second.communicate(timeout=900)
    assert (first.returncode, second.returncode) == (0, 0), err1 + err2
    assert "✓ convert" in out1 and "✓ convert" in out2
    assert "taking over" not in out2 and leftovers(sandbox["build"] / "tiny") == []


# ----- bad inputs, each with its message ---------------------------------------------------------------------------
def test_an_unsupported_architecture_is_refused_before_olive_runs(sandbox, tmp_path):
    foo = tmp_path / "foo"
    shutil.copytree(sandbox["hf"], foo)
    config = json.loads((foo / "config.json").read_text())
    (foo / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"], "model_type": "foo"}))
    (sandbox["recipes"] / "foo.json").write_text(json.dumps(recipe(foo, name="foo")))
    proc = invoke(sandbox, "deploy", "--model", "foo", "--skip-proof")
    assert proc.returncode == 1
    message = " ".join(proc.stderr.split())
    assert (f"error: {foo}: architecture 'FooForCausalLM' (config.json architectures[0], model_type 'foo') is not "
            "supported: no registered family covers it (families: chatml (Qwen2ForCausalLM);") in message
    assert "cannot build it (it builds ChatGLMForConditionalGeneration" in message
    assert not (sandbox["build"] / "foo" / "olive").exists(), "Olive never ran"


def olive_workflow(model_path: str, **changes) -> dict:
    doc = {"input_model": {"type": "HfModel", "model_path": model_path},
           "systems": {"local_system": {"type": "LocalSystem", "accelerators": [
               {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
           "passes": {"builder": {"type": "ModelBuilder", "config": {
               "precision": "int4", "quantization_config": {"block_size": 32, "is_symmetric": True}}}},
           "host": "local_system", "target": "local_system", "cache_dir": "cache", "output_dir": "models/wf-tiny",
           "log_severity_level": 1, "evaluate_input_model": False}
    return {**doc, **changes}


def test_an_olive_workflow_given_as_a_recipe_is_recognised_and_translated(sandbox):
    path = sandbox["root"] / "olive-workflow.json"
    path.write_text(json.dumps(olive_workflow(str(sandbox["hf"]))))
    proc = invoke(sandbox, "check", "--model", str(path))
    out = " ".join(proc.stdout.split())
    assert "olive-workflow.json: Olive workflow: passes.builder (ModelBuilder) → conversion" in out
    assert "output_dir 'models/wf-tiny' → name and foundry.name 'wf-tiny'" in out
    assert proc.returncode == 1 and "wf-tiny" in proc.stderr and "does not exist" in proc.stderr  # not deployed yet


@pytest.mark.slow
def test_an_olive_workflow_given_as_a_recipe_deploys(sandbox):
    path = sandbox["root"] / "olive-workflow.json"
    path.write_text(json.dumps(olive_workflow(str(sandbox["hf"]))))
    proc = invoke(sandbox, "deploy", "--model", str(path), "--skip-proof")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (sandbox["cache"] / "slmops" / "wf-tiny" / "inference_model.json").is_file()


def test_an_olive_workflow_that_cannot_translate_is_refused_naming_the_supported_form(sandbox):
    path = sandbox["root"] / "gpu-workflow.json"
    gpu = {"gpu_system": {"type": "LocalSystem", "accelerators": [
        {"device": "gpu", "execution_providers": ["CUDAExecutionProvider"]}]}}
    path.write_text(json.dumps(olive_workflow(str(sandbox["hf"]), systems=gpu)))
    proc = invoke(sandbox, "deploy", "--model", str(path), "--skip-proof")
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 1
    assert "this is an Olive workflow (olive run --config), not a recipe, and systems.gpu_system targets gpu" in message
    assert SUPPORTED_FORM in message


DEFAULT_CLIENT = r"""
import json, sys
from pathlib import Path
from scripts.runtimes.foundry_sdk import LiveChat, _sdk
with LiveChat(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]) as chat:
    sdk = _sdk()
    def ask(options):
        with sdk.ChatSession(chat.model) as session:
            request = sdk.Request()
            request.add_item(sdk.MessageItem(sdk.MessageRole.USER, "Hello"))
            if options:
                request.set_options(sdk.RequestOptions(search=sdk.SearchOptions(**options)))
            try:
                with session.process_request(request) as response:
                    return {"ok": True, "tokens": response.get_usage().completion_tokens}
            except sdk.FoundryLocalException as exc:
                return {"ok": False, "error": str(exc)}
    print(json.dumps([ask(None), ask({"max_output_tokens": 16, "do_sample": False})]))
"""


def test_a_default_sdk_client_is_refused_by_a_small_context_model_and_the_check_says_so(sandbox, deployed):
    """What docs/reliability.md's "Calling the deployed model from your code" states: the SDK's defaults reserve 2048 output tokens; the limit is
    genai_config.json model.context_length, which the deploy lowers to the recipe's generation.max_length (the tiny
    model's 512 positions → 256 or 200 here); passing max_output_tokens works."""
    assert "a Foundry Local SDK client with default options reserves 2048 output tokens and is refused" in \
        " ".join(deployed.stdout.split())
    proc = subprocess.run([sys.executable, "-c", DEFAULT_CLIENT, str(sandbox["cache"]), str(sandbox["installed"]),
                           "tiny-rel:1"], cwd=REPO, env=sandbox["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    default, sized = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not default["ok"] and "2048 output" in default["error"]
    genai = json.loads((sandbox["installed"] / "genai_config.json").read_text())
    assert genai["model"]["context_length"] == genai["search"]["max_length"] < 512, "one limit, the recipe's"
    assert f"exceeds the model's maximum context length of {genai['search']['max_length']} tokens" in default["error"]
    assert sized == {"ok": True, "tokens": 16}


LOADED_DURING_INSTALL = r"""
import json, shutil, sys
from pathlib import Path
from scripts.convert.install import install_package
from scripts.runtimes.foundry_sdk import LiveChat
cache, package = Path(sys.argv[1]), Path(sys.argv[2])
target = cache / "slmops" / "tiny-qwen2"
messages = [{"role": "user", "content": "Hello"}]
with LiveChat(cache, target, "tiny-qwen2:1") as chat:
    before = "".join(chat.stream(messages, 8))
    inode = target.stat().st_ino
    install_package(package, cache, "slmops", "tiny-qwen2")
    after = "".join(chat.stream(messages, 8))
    loaded = chat.model.is_loaded
    chat.model.unload()
    chat.model.load()
    reloaded = "".join(chat.stream(messages, 8))
print(json.dumps({"swapped": inode != target.stat().st_ino, "same": before == after, "loaded": loaded,
                  "reloaded": reloaded == before}))
"""


def test_a_model_loaded_while_it_is_reinstalled_keeps_answering_and_reloads(tmp_path, tiny_onnx_model):
    """The reason for exchanging folders rather than swapping a symlink: a process that has the model loaded (a chat,
    a server) keeps answering from the files it has open, and unload/load then picks up the new install."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_onnx_model, cache / "slmops" / "tiny-qwen2")
    package = shutil.copytree(tiny_onnx_model, tmp_path / "package")
    genai = json.loads((package / "genai_config.json").read_text())
    genai["search"]["max_length"] = 300
    (package / "genai_config.json").write_text(json.dumps(genai))
    env = dict(os.environ, HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "home" / ".cache"))
    proc = subprocess.run([sys.executable, "-c", LOADED_DURING_INSTALL, str(cache), str(package)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"swapped": True, "same": True, "loaded": True,
                                                                "reloaded": True}
    assert json.loads((cache / "slmops" / "tiny-qwen2" / "genai_config.json").read_text())["search"]["max_length"] == 300
