"""Tests for scripts/core/workers.py: the one child-process protocol every worker speaks (real child processes)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scripts.core.errors import FoundryError, MeasurementError, ModelSourceError
from scripts.core.settings import REPO_ROOT
from scripts.core.workers import run_in_worker, serve_one, tail, worker_command, worker_env


def test_result_comes_back(tiny_onnx_model):
    result = run_in_worker("scripts.runtimes.genai_smoke:generate",
                           {"model_dir": str(tiny_onnx_model), "prompt": "Hello", "max_new_tokens": 3},
                           error=MeasurementError, what="generating")
    assert 1 <= result["tokens"] <= 3 and result["load_seconds"] > 0


def test_reported_domain_error_is_the_callers_type_with_the_childs_message():
    with pytest.raises(FoundryError) as info:
        run_in_worker("scripts.runtimes.foundry_sdk:check_job", {}, error=FoundryError, what="checking x:1")
    assert str(info.value).startswith("Checking x:1 failed: Worker request lacks cache_dir, model_dir, model_id, "
                                      "conversations.")
    assert info.value.child_error_type == "FoundryError"


def test_crash_is_the_callers_type_with_the_exception_and_the_log_tail():
    with pytest.raises(MeasurementError) as info:
        run_in_worker("scripts.proof.measure:run_request", {}, error=MeasurementError, what="measuring nothing")
    message = str(info.value)
    assert "Measuring nothing failed: scripts.proof.measure:run_request crashed: KeyError: 'backend'" in message
    assert "Worker stderr (tail):" in message and "Traceback" in message
    assert info.value.child_error_type == "KeyError"


def test_a_native_crash_says_what_to_do_about_it(monkeypatch):
    # a child killed by SIGSEGV, as a crash in native code (llama.cpp's AMX kernels) kills it
    import scripts.core.workers as workers
    monkeypatch.setattr(workers, "worker_command", lambda *a: [sys.executable, "-c",
                                                              "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    with pytest.raises(MeasurementError) as info:
        run_in_worker("scripts.proof.measure:run_request", {}, error=MeasurementError,
                      what="measuring x with llama.cpp", crash_hint="rebuild it without AMX")
    assert "the worker exited with code -11 without a result; rebuild it without AMX." in str(info.value)


def test_timeout_names_the_work_and_the_hint():
    with pytest.raises(ModelSourceError, match=r"Building the demo did not finish within 0 s; wait longer"):
        run_in_worker("scripts.sources.demo:build", {"inputs": ["x"], "out_dir": "y"}, error=ModelSourceError,
                      what="building the demo", timeout=0.01, hint="wait longer")


def test_only_project_functions_can_be_called():
    payload, code = serve_one("os:system", json.dumps({}))
    assert code == 2 and payload["ok"] is False
    assert "worker target must be 'scripts.<module>:<function>'" in payload["error"]
    payload, code = serve_one("scripts.core.workers:tail", "[1, 2]")
    assert code == 2 and "the request must be a JSON object" in payload["error"]


def test_stdin_stdout_mode():
    """Without --input/--output the request comes on stdin and the answer is the only thing on stdout."""
    proc = subprocess.run(worker_command("scripts.runtimes.foundry_sdk:check_job"), input="{}", capture_output=True,
                          text=True, cwd=REPO_ROOT, env=worker_env(), timeout=120)
    assert proc.returncode == 2
    assert json.loads(proc.stdout) == {"ok": False, "error_type": "FoundryError", "error": (
        "Worker request lacks cache_dir, model_dir, model_id, conversations.")}


def test_helpers():
    assert tail("a\nb\nc\n", 2) == "b\nc" and tail(b"x\ny", 1) == "y" and tail(None) == ""
    assert worker_command("scripts.a:b")[1:] == ["-m", "scripts.core.workers", "scripts.a:b"]
    assert worker_env()["PYTHONPATH"].split(":")[0] == str(REPO_ROOT)


def test_a_worker_dies_with_its_parent():
    """A killed command must leave no worker (Olive, a model build) writing into folders the next command recovers."""
    import psutil

    parent = ("import subprocess, sys, os, signal\n"
              "from scripts.core.workers import die_with_parent\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], stdin=subprocess.PIPE,\n"
              "                         preexec_fn=die_with_parent())\n"
              "print(child.pid, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", parent], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9
    child = psutil.Process(int(proc.stdout.strip()))
    try:
        child.wait(timeout=30)  # SIGKILLed by the kernel when its parent died (raises TimeoutExpired otherwise)
    except psutil.NoSuchProcess:
        pass  # already gone and reaped
    assert not child.is_running()
