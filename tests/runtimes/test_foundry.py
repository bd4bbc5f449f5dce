"""Foundry Local runtime: real foundry-local-sdk in worker subprocesses, no mocks of Foundry.

The v1 CLI (absent on Linux) is exercised with a fake command runner and a fake ``foundry`` script.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.runtimes import foundry as fr
from scripts.runtimes import foundry_api as api
from scripts.runtimes import foundry_cli as cli
from scripts.core.errors import FoundryError
from scripts.core.settings import REPO_ROOT

HELLO = [{"role": "user", "content": "Hello"}]
MULTI_TURN = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Nothing may land in ~: the runtime's telemetry store follows XDG_CACHE_HOME/HOME."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("SLMOPS_FOUNDRY_CACHE", str(tmp_path / "foundry-cache"))
    return home


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "foundry-cache"


def install(model: Path, cache: Path, publisher: str = "slmops", name: str = "tiny-qwen2") -> Path:
    dest = cache / publisher / name
    shutil.copytree(model, dest)
    return dest


def registry(cache: Path) -> list[dict]:
    return json.loads((cache / api.REGISTRY_FILE).read_text())["models"]


# ------------------------------------------------------------------------------------------------
# Real runtime, through the worker
# ------------------------------------------------------------------------------------------------


def test_check_registers_lists_loads_and_answers(tiny_onnx_model, cache_dir, isolated_home):
    model_dir = install(tiny_onnx_model, cache_dir)
    result = fr.check_model(cache_dir, model_dir, "tiny-qwen2:1", [HELLO, MULTI_TURN, HELLO], max_tokens=8)

    assert result.model_id == "tiny-qwen2:1"
    assert result.listed is True
    assert result.registration == "registered"
    assert result.load_seconds >= 0
    assert len(result.answers) == 3
    for a in result.answers:
        assert isinstance(a.text, str) and a.text
        assert a.seconds > 0
        assert a.first_token_seconds is not None and a.first_token_seconds <= a.seconds
        assert a.tokens is not None and 1 <= a.tokens <= 8
    # genai_config.json says do_sample=false: greedy, so the same prompt gives the same answer.
    assert result.answers[0].text == result.answers[2].text
    # Registration persisted beside the cache; runtime logs under the cache, not in ~.
    entries = registry(cache_dir)
    assert [(e["model_info"]["id"], e["model_path"]) for e in entries] == [("tiny-qwen2:1", str(model_dir))]
    assert entries[0]["model_info"]["displayName"] == "tiny-qwen2"  # from inference_model.json Name
    assert result.logs_dir == cache_dir.resolve() / api.RUNTIME_DIR_NAME / "logs"
    assert result.logs_dir.is_dir()
    assert not (isolated_home / ".foundry").exists()
    # Files are referenced in place, not copied into the cache.
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(
        [api.RUNTIME_DIR_NAME, api.REGISTRY_FILE, "foundry.local.modelinfo.lock", "slmops"])


def test_register_again_same_path_is_a_no_op(tiny_onnx_model, cache_dir):
    model_dir = install(tiny_onnx_model, cache_dir)
    first = fr.check_model(cache_dir, model_dir, "tiny-qwen2:1", [HELLO], max_tokens=4)
    before = (cache_dir / api.REGISTRY_FILE).read_text()
    second = fr.check_model(cache_dir, model_dir, "tiny-qwen2:1", [HELLO], max_tokens=4)
    assert (first.registration, second.registration) == ("registered", "unchanged")
    assert second.listed
    assert (cache_dir / api.REGISTRY_FILE).read_text() == before


def test_register_with_new_path_replaces(tiny_onnx_model, cache_dir, tmp_path):
    old_dir = install(tiny_onnx_model, cache_dir)
    fr.check_model(cache_dir, old_dir, "tiny-qwen2:1", [HELLO], max_tokens=4)
    new_dir = install(tiny_onnx_model, cache_dir, publisher="slmops-v2")
    result = fr.check_model(cache_dir, new_dir, "tiny-qwen2:1", [HELLO], max_tokens=4)
    assert result.registration == "replaced"
    assert result.listed and len(result.answers) == 1
    assert [(e["model_info"]["id"], e["model_path"]) for e in registry(cache_dir)] == [
        ("tiny-qwen2:1", str(new_dir))]
    assert old_dir.is_dir()  # unregistering never deletes files


def test_runtime_error_reaches_caller(tiny_onnx_model, cache_dir):
    model_dir = install(tiny_onnx_model, cache_dir)
    with pytest.raises(FoundryError) as info:  # 600 output tokens > the model's 512-token context
        fr.check_model(cache_dir, model_dir, "tiny-qwen2:1", [HELLO], max_tokens=600)
    assert "tiny-qwen2:1 failed to answer" in str(info.value)
    assert "maximum context length of 512" in str(info.value)


def test_broken_model_file_reports_load_failure(tiny_onnx_model, cache_dir):
    model_dir = install(tiny_onnx_model, cache_dir)
    (model_dir / "model.onnx").write_bytes(b"this is not an onnx graph")
    with pytest.raises(FoundryError) as info:
        fr.check_model(cache_dir, model_dir, "tiny-qwen2:1", [HELLO], max_tokens=4)
    message = str(info.value)
    assert "could not load tiny-qwen2:1" in message
    assert str(model_dir) in message


def test_worker_timeout_is_a_foundry_error(tiny_onnx_model, cache_dir):
    model_dir = install(tiny_onnx_model, cache_dir)
    with pytest.raises(FoundryError, match="did not finish within"):
        fr.check_model(cache_dir, model_dir, "tiny-qwen2:1", [HELLO], max_tokens=4, timeout=0.05)


def test_worker_stdin_stdout_protocol(tiny_onnx_model, cache_dir):
    """stdout carries only the JSON answer, even though the runtime prints."""
    model_dir = install(tiny_onnx_model, cache_dir)
    request = {"cache_dir": str(cache_dir), "model_dir": str(model_dir), "model_id": "tiny-qwen2:1",
               "conversations": [HELLO], "max_tokens": 4}
    worker = [sys.executable, "-m", "scripts.core.workers", "scripts.runtimes.foundry_sdk:check_job"]
    proc = subprocess.run(worker, input=json.dumps(request),
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["ok"] is True
    assert payload["result"]["listed"] is True and len(payload["result"]["answers"]) == 1

    bad = subprocess.run(worker,
                         input=json.dumps({**request, "model_dir": str(cache_dir / "nope")}),
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert bad.returncode == 2
    assert json.loads(bad.stdout) == {"ok": False, "error_type": "FoundryError", "error": (
        f"Model folder {cache_dir / 'nope'} does not exist; install the converted model first.")}


def test_chat_stream_in_a_fresh_process(tiny_onnx_model, cache_dir):
    model_dir = install(tiny_onnx_model, cache_dir)
    code = (
        "import json, sys\n"
        "from scripts.runtimes.foundry_sdk import LiveChat\n"
        "c, m = sys.argv[1], sys.argv[2]\n"
        "msgs = [{'role': 'user', 'content': 'Hello'}]\n"
        "with LiveChat(c, m, 'tiny-qwen2:1') as chat:\n"
        "    a = list(chat.stream(msgs, max_tokens=6))\n"
        "    b = list(chat.stream(msgs, max_tokens=6))\n"
        "    assert 'onnxruntime_genai' not in sys.modules\n"
        "print(json.dumps([a, b]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(cache_dir), str(model_dir)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    a, b = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(a) >= 1 and a == b  # streamed in pieces; greedy, and no history carried over


# ------------------------------------------------------------------------------------------------
# Input checks (no runtime needed)
# ------------------------------------------------------------------------------------------------


def test_folder_without_genai_config_is_refused(tiny_onnx_model, cache_dir):
    model_dir = install(tiny_onnx_model, cache_dir)
    (model_dir / "genai_config.json").unlink()
    with pytest.raises(FoundryError, match="has no genai_config.json"):
        fr.check_model(cache_dir, model_dir, "tiny-qwen2:1", [HELLO])
    assert not (cache_dir / api.REGISTRY_FILE).exists()


@pytest.mark.parametrize("model_id", ["tiny", "tiny:latest", "tiny:1:2", "", "bad name:1"])
def test_bad_model_id_is_refused(tiny_onnx_model, model_id):
    with pytest.raises(FoundryError, match="<name>:<version>"):
        fr.check_model(Path("/nonexistent"), tiny_onnx_model, model_id, [HELLO])


@pytest.mark.parametrize("conversation", [[], [{"role": "robot", "content": "x"}], [{"role": "user"}]])
def test_bad_conversation_is_refused(tiny_onnx_model, conversation):
    with pytest.raises(FoundryError):
        fr.check_model(Path("/nonexistent"), tiny_onnx_model, "tiny-qwen2:1", [conversation])


def test_search_options_follow_genai_config():
    greedy = {"search": {"do_sample": False, "temperature": 1.0, "top_k": 50}}
    assert api.search_options_from_genai_config(greedy, 16) == {"max_output_tokens": 16, "do_sample": False}
    assert api.search_options_from_genai_config({}, 16) == {"max_output_tokens": 16, "do_sample": False}
    sampled = {"search": {"do_sample": True, "temperature": 0.7, "top_k": 40, "top_p": 0.9}}
    assert api.search_options_from_genai_config(sampled, 8) == {
        "max_output_tokens": 8, "do_sample": True, "temperature": 0.7, "top_k": 40, "top_p": 0.9}
    assert api.search_options_from_genai_config(greedy, 8, {"do_sample": True, "temperature": 0.2, "seed": 1}) == {
        "max_output_tokens": 8, "do_sample": True, "temperature": 0.2, "seed": 1}
    with pytest.raises(FoundryError, match=">= 1"):
        api.search_options_from_genai_config(greedy, 0)
    with pytest.raises(FoundryError, match="Unknown generation option"):
        api.search_options_from_genai_config(greedy, 8, {"repetition_penalty": 1.1})


def test_cache_root_without_cli(cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert not cli.foundry_cli_available()
    assert fr.cache_root() == cache_dir.resolve()


# ------------------------------------------------------------------------------------------------
# v1 CLI path (Windows/macOS), with fakes
# ------------------------------------------------------------------------------------------------


class FakeFoundry:
    """Fake command runner answering like the v1 CLI."""

    def __init__(self, listed=("tiny-qwen2",), fail=None):
        self.calls: list[list[str]] = []
        self.listed = listed
        self.fail = fail

    def __call__(self, args, timeout):
        args = list(args)
        self.calls.append(args)
        assert args[0] == "foundry"
        sub = args[1:]
        if self.fail and sub[:len(self.fail)] == self.fail:
            return subprocess.CompletedProcess(args, 1, "", "Model not found in cache")
        if sub == ["cache", "location"]:
            out = "💾 Cache directory path: /Users/me/.foundry/cache/models\n"
        elif sub == ["cache", "ls"]:
            out = "Models cached on device:\n   Alias          Model ID\n" + "".join(
                f"💾 {n}    {n}\n" for n in self.listed)
        elif sub[:2] == ["model", "load"]:
            out = f"Model {sub[2]} loaded\n"
        elif sub[:2] == ["model", "run"]:
            out = f"echo: {sub[sub.index('--prompt') + 1]}\n"
        else:
            return subprocess.CompletedProcess(args, 2, "", f"unknown command {sub}")
        return subprocess.CompletedProcess(args, 0, out, "")


def test_cli_cache_location_parses_path():
    assert cli.cli_cache_location(FakeFoundry()) == Path("/Users/me/.foundry/cache/models")


def test_cli_check_model(tiny_onnx_model):
    fake = FakeFoundry()
    result = fr.check_model(Path("/unused"), tiny_onnx_model, "ignored:1", [HELLO, MULTI_TURN],
                            use_cli=True, runner=fake)
    assert result.listed and result.registration == "cli" and result.model_id == "tiny-qwen2"
    assert [a.text for a in result.answers] == ["echo: Hello", "echo: What is the capital of France?"]
    assert fake.calls[0] == ["foundry", "cache", "ls"]
    assert fake.calls[1] == ["foundry", "model", "load", "tiny-qwen2"]


def test_cli_model_not_listed(tiny_onnx_model):
    with pytest.raises(FoundryError, match="does not list tiny-qwen2"):
        cli.cli_check_model(tiny_onnx_model, [HELLO], runner=FakeFoundry(listed=("other-model",)))


def test_cli_command_failure_carries_output(tiny_onnx_model):
    with pytest.raises(FoundryError, match=r"foundry model load tiny-qwen2` failed \(exit 1\): Model not found"):
        cli.cli_check_model(tiny_onnx_model, [HELLO], runner=FakeFoundry(fail=["model", "load"]))


def test_cli_needs_inference_model_name(tiny_onnx_model, tmp_path):
    model_dir = shutil.copytree(tiny_onnx_model, tmp_path / "m")
    (model_dir / "inference_model.json").unlink()
    with pytest.raises(FoundryError, match="no string 'Name'"):
        cli.cli_check_model(model_dir, [HELLO], runner=FakeFoundry())


def test_fake_foundry_on_path_is_used_for_cache_root(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "foundry"
    script.write_text("#!/bin/sh\n[ \"$1 $2\" = \"cache location\" ] && "
                      "echo 'Cache directory path: /opt/foundry/models' && exit 0\nexit 3\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ["PATH"])
    assert cli.foundry_cli_available()
    assert fr.cache_root() == Path("/opt/foundry/models")
