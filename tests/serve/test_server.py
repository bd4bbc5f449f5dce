"""`invoke serve`: the real server (Foundry Local's web service behind the OpenAI layer) on a free loopback port, asked
through the official ``openai`` client and raw HTTP; no mocks of Foundry (the pure request/error side is in
test_serve_api.py). The tiny model's answers are noise, so correctness is checked against the runtime itself: greedy
answers over HTTP must equal the in-process ones, and each concurrent answer the one the same prompt got alone."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import psutil
import pytest

from scripts.core.errors import ServeError
from scripts.core.evalset import QA
from scripts.commands.serve_check import failure_message, run_serve_check
from scripts.runtimes import foundry as fr
from scripts.serve import server as sv
from scripts.serve.client import openai_client
from scripts.core.settings import REPO_ROOT
from tests.signals import ctrl_c_reaches_it

MODEL_ID = "tiny-qwen2:1"
HELLO = [{"role": "user", "content": "Hello"}]
MULTI_TURN = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is the capital of France?"}]


# ----- planning and the listening socket -----------------------------------------------------------------------------
def test_plan_serve_refuses_a_model_that_is_not_installed(tmp_path):
    with pytest.raises(ServeError, match="run `invoke deploy` first"):
        sv.plan_serve(tmp_path, tmp_path / "slmops" / "nothing", MODEL_ID)


def test_listening_socket_is_tcp_so_replies_are_not_delayed():
    """asyncio sets TCP_NODELAY on accepted connections only when the listening socket's proto is TCP; with proto 0
    each small reply waited ~40 ms for a delayed ACK (measured: /health 44 ms → 6 ms)."""
    sock = sv.bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP and sock.getsockname()[1] > 0
    finally:
        sock.close()


# ----- the real server -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """HOME and XDG_CACHE_HOME of the server process: nothing may land in ~."""
    home = tmp_path_factory.mktemp("serve-home")
    return {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory, tiny_onnx_model) -> tuple[Path, Path]:
    cache = tmp_path_factory.mktemp("serve-cache")
    model_dir = cache / "slmops" / "tiny-qwen2"
    shutil.copytree(tiny_onnx_model, model_dir)
    return cache, model_dir


@pytest.fixture(scope="module")
def server(installed, env, tmp_path_factory):
    cache, model_dir = installed
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    srv = sv.ServerProcess(sv.plan_serve(cache, model_dir, MODEL_ID, port=0), log_path=log, env=env).start()
    yield srv
    if srv.running():
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server.base_url, timeout=120)


def chat(client, messages=HELLO, **kw):
    return client.chat.completions.create(model=MODEL_ID, messages=messages, **kw)


def test_models_lists_the_served_model_only(client, server):
    assert server.url.startswith("http://127.0.0.1:")
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other:1")


def test_default_client_gets_greedy_answers_equal_to_in_process(client, installed, env, monkeypatch):
    """No temperature, no max_tokens: the recipe's greedy decoding and the rest of the context (the runtime alone
    samples and reserves 2048 tokens, a 400 on this 512-token model)."""
    a = chat(client, MULTI_TURN)
    b = chat(client, MULTI_TURN)
    assert a.choices[0].message.content == b.choices[0].message.content  # greedy: reproducible
    u = a.usage
    assert u.prompt_tokens > 20 and 1 <= u.completion_tokens <= 512 - u.prompt_tokens
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert a.choices[0].finish_reason in ("stop", "length") and a.model == MODEL_ID
    capped = chat(client, MULTI_TURN, max_tokens=12)
    assert capped.usage.completion_tokens <= 12
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cache, model_dir = installed
    inproc = fr.check_model(cache, model_dir, MODEL_ID, [MULTI_TURN], max_tokens=12).answers[0]
    assert capped.choices[0].message.content == inproc.text  # same runtime, same greedy tokens


def test_streaming_matches_non_streaming_and_ends_with_done(client, server):
    full = chat(client, max_tokens=16, temperature=0)
    pieces, usage, finish = [], None, None
    for chunk in chat(client, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}):
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == full.choices[0].message.content and len([p for p in pieces if p]) > 1
    assert usage.completion_tokens == full.usage.completion_tokens and finish == full.choices[0].finish_reason
    with httpx.stream("POST", server.base_url + "/chat/completions", timeout=60,
                      json={"model": MODEL_ID, "messages": HELLO, "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_stop_sequences_cut_the_answer(client):
    text = chat(client, max_tokens=24, temperature=0).choices[0].message.content
    cut = next(i for i in range(1, len(text)) if text[i].isalnum() and text[i] not in text[:i])
    stopped = chat(client, max_tokens=24, temperature=0, stop=[text[cut]])
    assert stopped.choices[0].message.content == text[:cut] and stopped.choices[0].finish_reason == "stop"
    streamed = "".join(ch.delta.content or "" for c in chat(client, max_tokens=24, temperature=0, stop=text[cut],
                                                              stream=True) for ch in c.choices)
    assert streamed == text[:cut]


def test_sampling_options_reach_the_runtime(client):
    greedy = chat(client, max_tokens=24, temperature=0).choices[0].message.content
    sampled = {chat(client, max_tokens=24, temperature=2.0, top_p=1.0).choices[0].message.content for _ in range(4)}
    assert sampled != {greedy}  # a high temperature samples; the default would not
    assert {chat(client, max_tokens=24, temperature=2.0, extra_body={"top_k": 1}).choices[0].message.content
            for _ in range(2)} == {greedy}  # top_k 1 is greedy whatever the temperature


def test_eight_concurrent_requests_do_not_corrupt_each_other(client):
    prompts = [[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}] for i in range(8)]
    alone = [chat(client, p, max_tokens=32, temperature=0).choices[0].message.content for p in prompts]
    assert len(set(alone)) > 1  # the prompts give different answers, so a mix-up would show

    def ask(i):
        if i % 2:
            return "".join(ch.delta.content or "" for c in chat(client, prompts[i], max_tokens=32, temperature=0,
                                                                  stream=True) for ch in c.choices)
        return chat(client, prompts[i], max_tokens=32, temperature=0).choices[0].message.content
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == alone


def test_unknown_model_is_a_404_in_openai_form(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=4)
    assert info.value.status_code == 404 and info.value.code == "model_not_found"
    assert MODEL_ID in info.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_over_context_prompt_is_a_400_with_the_runtimes_message(client, stream):
    long = [{"role": "user", "content": "hello " * 600}]
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, long, max_tokens=8, stream=stream)
    assert info.value.status_code == 400 and info.value.code == "context_length_exceeded"
    assert "exceeds the model's maximum context length of 512 tokens" in info.value.message
    with pytest.raises(openai.BadRequestError, match="maximum context length of 512"):  # no max_tokens either
        chat(client, long, stream=stream)


@pytest.mark.parametrize("content, fragment", [
    (b'{"model": "tiny-qwen2:1", "messages": [', "could not parse the JSON body"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"model": "tiny-qwen2:1", "messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
    (b'{"model": "tiny-qwen2:1", "messages": [{"role": "user", "content": "x"}], "n": 3}', "one choice per request"),
])
def test_malformed_bodies_are_400_json_errors(server, content, fragment):
    r = httpx.post(server.base_url + "/chat/completions", content=content, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"


def test_other_routes_answer_openai_style_json(server, client):
    for method, path, status in [("POST", "/completions", 404), ("GET", "/nothing", 404),
                                 ("GET", "/chat/completions", 405)]:
        r = httpx.request(method, server.base_url + path, json={"model": MODEL_ID, "prompt": "Hi"}, timeout=30)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, path
    with pytest.raises(openai.NotFoundError, match="chat completions only"):
        client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=4)
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok", "model": MODEL_ID,
                                                                     "base_url": "/v1"}


def test_server_stops_cleanly_and_frees_its_port(installed, env, tmp_path):
    cache, model_dir = installed
    srv = sv.ServerProcess(sv.plan_serve(cache, model_dir, MODEL_ID, port=0), log_path=tmp_path / "s.log",
                           env=env).start()
    port = int(srv.url.rsplit(":", 1)[1])
    stream = chat(openai_client(srv.base_url), max_tokens=200, temperature=0, stream=True)
    next(iter(stream))  # a request in flight while stopping
    result = srv.stop()
    assert srv.proc.returncode == 0 and result["stopped_by"] == "SIGTERM" and result["port"] == port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    assert "Finished server process" in (tmp_path / "s.log").read_text()


def test_server_exits_when_the_process_that_started_it_dies(installed, env, tmp_path):
    """No orphan servers: killing the starter (kill -9: no cleanup runs) stops the server within seconds."""
    cache, model_dir = installed
    starter = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from scripts.serve import server as sv
        srv = sv.ServerProcess(sv.plan_serve(Path({str(cache)!r}), Path({str(model_dir)!r}), {MODEL_ID!r}, port=0),
                               log_path=Path({str(tmp_path / "s.log")!r}), env={env!r}).start()
        print(srv.pid, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", starter], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    server_pid = int(proc.stdout.readline())
    os.kill(server_pid, 0)  # running
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and psutil.pid_exists(server_pid) and \
            psutil.Process(server_pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.2)
    assert not psutil.pid_exists(server_pid) or psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE
    assert "Finished server process" in (tmp_path / "s.log").read_text()


def test_busy_port_is_a_clear_error(installed, env, tmp_path):
    cache, model_dir = installed
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServeError, match=rf"Cannot listen on 127.0.0.1:{port}.*pick another port with --port"):
            sv.ServerProcess(sv.plan_serve(cache, model_dir, MODEL_ID, port=port), log_path=tmp_path / "s.log",
                             env=env).start()


def test_invoke_serve_foreground_stops_on_ctrl_c(installed, env, tmp_path):
    """`invoke serve` as a user runs it: prints the base URL, serves, and Ctrl-C (SIGINT to the process group, as a
    terminal sends it) stops both processes with exit code 0."""
    cache, model_dir = installed
    shutil.copytree(model_dir, tmp_path / "cache" / "slmops" / "brightwater-qwen-int4")  # as the qwen recipe installs
    sock = sv.bind_socket("127.0.0.1", 0)
    free = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "invoke", "serve", "--model", "qwen", "--port", str(free)],
                            cwd=REPO_ROOT, env={**os.environ, **env, "SLMOPS_FOUNDRY_CACHE": str(tmp_path / "cache"),
                                                "SLMOPS_BUILD_DIR": str(tmp_path / "build")},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=ctrl_c_reaches_it)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Ctrl-C stops the server" in line or not line:
                break
        out = "".join(lines)
        assert f"http://127.0.0.1:{free}/v1" in out, out
        answer = openai_client(f"http://127.0.0.1:{free}/v1").chat.completions.create(
            model="brightwater-qwen-int4:1", messages=HELLO, max_tokens=4)
        assert answer.usage.completion_tokens >= 1
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_serve_check_reports_http_beside_in_process(installed, env, monkeypatch, tmp_path):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cache, model_dir = installed
    qa = [QA("Hello", "nothing the tiny model says"), QA("What is the capital of France?", "Paris")]
    result = run_serve_check(cache, model_dir, MODEL_ID, qa, max_tokens=8, log_path=tmp_path / "s.log", env=env)
    inproc, streamed, plain = result["columns"]
    assert result["listed"] == [MODEL_ID] and result["server"]["stopped_by"] == "SIGTERM"
    assert streamed["same_count"] == 2  # same greedy answers over HTTP as in-process
    assert inproc["ttft_ms"] > 0 and streamed["ttft_ms"] > 0 and streamed["request_s"] > 0
    assert [c["accuracy"] for c in result["columns"]] == [0.0, 0.0, 0.0]
    assert "answered 0.0 % (0/2) over HTTP" in failure_message(result, 0.9)
    assert failure_message(result, 0.0) is None
