"""`invoke serve`: the installed model behind a standard OpenAI endpoint (``http://HOST:PORT/v1``), served by
Foundry Local's own web service.

What foundry-local-sdk 2.2.1 offers, measured on Linux (docs/serving.md): its web service serves models of the
LOCAL catalog (ours) under the undocumented prefix ``/catalogs/local`` once they are loaded in the serving process,
with OpenAI JSON, SSE streaming, ``usage``, ``stop``, ``max_tokens``, ``temperature``, ``top_p``, and correct
answers under concurrent requests. What it lacks, and the thin layer adds (Starlette on uvicorn: the app in
:mod:`scripts.serve.app`, its pure request checks, defaults and errors in :mod:`scripts.serve.api`):

- the standard base URL ``/v1`` (the root routes are the public catalog's: 404 for our model, ~4 s of retries
  offline);
- the recipe's generation defaults when a client leaves them out: the runtime samples unless told and reserves
  2048 output tokens, so a default client got random text, or a 400 on a 512-token model. Here an omitted
  ``temperature`` follows ``genai_config.json`` ``search`` (greedy when ``do_sample`` is false) and an omitted
  ``max_tokens`` becomes the rest of the context, counted by the runtime itself (:func:`foundry_sdk.preflight_openai`);
- OpenAI-style JSON errors with the right status where the service gives none or the wrong one: a streamed
  over-context request answers 200 with an error event (here: 400 before the stream starts), unknown routes and
  ``/v1/completions`` answer plain text, a wrong role, a string ``max_tokens`` or ``n`` > 1 were silently accepted;
- ``/v1/models`` lists the served model only (the service lists every registered one, loaded or not), and the
  bare name (without ``:version``) is accepted as the model.

Everything else goes to the runtime unchanged, and its answers and errors come back unchanged. The Foundry SDK
is loaded only in the server process (:func:`serve_job`, started by :class:`ServerProcess` through
:mod:`scripts.core.workers`), never beside ``onnxruntime_genai``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from scripts.core import settings
from scripts.core.errors import FoundryError, ServeError, SlmopsError
from scripts.core.hf_folder import control_tokens
from scripts.core.fileops import write_text_atomic
from scripts.runtimes import foundry_sdk
from scripts.runtimes.foundry_api import validate_model_dir, validate_model_id
from scripts.core.hf_folder import read_chat_template
from scripts.families.tools import serving_spec
from scripts.serve.api import (DEFAULT_HOST, DEFAULT_PORT, ServePlan, generation_defaults, is_loopback,
                                        url_host)
from scripts.serve.app import build_app
from scripts.core.workers import tail, worker_command, worker_env

log = logging.getLogger(__name__)

UPSTREAM_BIND = "http://127.0.0.1:0"  # Foundry's own service: loopback, any free port, reached only by the layer
READY_TIMEOUT = 180.0
STOP_TIMEOUT = 30.0


# ----- planning -------------------------------------------------------------------------------------------------------
def plan_serve(cache_dir: Path, model_dir: Path, model_id: str, host: str = DEFAULT_HOST,
               port: int = DEFAULT_PORT) -> ServePlan:
    """Check the installed model and the address (before any process starts); return the plan."""
    validate_model_id(model_id)
    model_dir = Path(model_dir)
    if not (model_dir / "genai_config.json").is_file():
        raise ServeError(f"{model_id} is not installed at {model_dir}; run `invoke deploy` first.")
    try:
        genai_config = validate_model_dir(model_dir)
    except FoundryError as exc:
        raise ServeError(str(exc)) from exc
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ServeError(f"--port must be an integer from 1 to 65535 (0: any free port), got {port!r}.")
    if not host:
        raise ServeError("--host must not be empty (127.0.0.1 serves this machine only).")
    limits = [v for v in (genai_config.get("model", {}).get("context_length"),
                          (genai_config.get("search") or {}).get("max_length")) if v]
    vocab = genai_config.get("model", {}).get("vocab_size")
    return ServePlan(cache_dir=str(Path(cache_dir).resolve()), model_dir=str(model_dir.resolve()), model_id=model_id,
                     host=host, port=port, defaults=generation_defaults(genai_config),
                     max_length=min(int(v) for v in limits) if limits else None,
                     tools=serving_spec(read_chat_template(model_dir)),
                     vocab_size=vocab if isinstance(vocab, int) else None, controls=_controls(model_dir))


def _controls(model_dir: Path) -> tuple[str, ...]:
    try:
        return tuple(control_tokens(model_dir))
    except SlmopsError as exc:
        raise ServeError(str(exc)) from None


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (``port`` 0: any free port), or a :class:`ServeError` saying why not."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ServeError(f"Cannot serve on host {host!r}: {exc}. Use an IP address such as 127.0.0.1.") from exc
    # proto IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY on accepted connections only when the listening socket
    # says TCP; without it every small response waited ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        hint = "another server is using it; pick another port with --port" if exc.errno == errno.EADDRINUSE else "check --host"
        raise ServeError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}; {hint}.") from exc
    sock.set_inheritable(False)
    return sock


def serve_job(request: dict) -> dict:
    """Worker entry (``scripts.core.workers``): register and load the model, start Foundry's web service on loopback,
    serve the OpenAI layer on ``plan.host:plan.port`` until SIGINT/SIGTERM (or the parent process goes away),
    then stop everything. Writes ``{"url", "base_url", "pid"}`` to ``request["ready_file"]`` once listening."""
    import uvicorn

    plan = ServePlan.from_json(request["plan"])
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per forwarded request: uvicorn's access log says it
    ready_file = Path(request["ready_file"])
    parent = os.getppid()
    stop = {"signal": None}

    def remember(signum, frame):  # before uvicorn takes over, and what it re-raises into when it is done
        stop["signal"] = stop["signal"] or signum
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, remember)

    sock = bind_socket(plan.host, plan.port)
    port = sock.getsockname()[1]
    t0 = time.perf_counter()
    manager = foundry_sdk.open_manager(Path(plan.cache_dir), web_url=UPSTREAM_BIND)
    timings: dict[str, float] = {}
    try:
        model, registration = foundry_sdk.ensure_registered(foundry_sdk.local_catalog(manager), Path(plan.model_dir),
                                                            plan.model_id)
        timings["load"] = 0.0 if model.is_loaded else foundry_sdk.load_model(model)
        upstream = foundry_sdk.start_web_service(manager)
        log.info("Foundry Local serves %s at %s", plan.model_id, upstream)
        app = build_app(plan, upstream, lambda body: foundry_sdk.preflight_openai(model, body))

        class Server(uvicorn.Server):
            async def startup(self, sockets=None):
                await super().startup(sockets=sockets)
                if self.started:
                    url = f"http://{url_host(plan.host)}:{port}"
                    timings["ready"] = time.perf_counter() - t0
                    write_text_atomic(ready_file, json.dumps({"url": url, "base_url": url + "/v1",
                                                              "pid": os.getpid(), "upstream": upstream}))
                    log.info("Serving %s at %s/v1", plan.model_id, url)

            async def on_tick(self, counter: int) -> bool:
                if stop["signal"] is not None or os.getppid() != parent:  # stop asked early, or orphaned
                    self.should_exit = True
                return await super().on_tick(counter)

        config = uvicorn.Config(app, log_config=None, access_log=True, timeout_graceful_shutdown=STOP_TIMEOUT - 5,
                                lifespan="on")
        server = Server(config)
        served = time.perf_counter()
        if stop["signal"] is None:
            server.run(sockets=[sock])
        timings["served"] = time.perf_counter() - served
    finally:
        sock.close()
        with contextlib.suppress(Exception):
            manager.stop_web_service()
        foundry_sdk.close_manager()
    return {"model_id": plan.model_id, "registration": registration, "port": port, "timings": timings,
            "stopped_by": signal.Signals(stop["signal"]).name if stop["signal"] else "parent-exit"}


# ----- the parent side -----------------------------------------------------------------------------------------------
class ServerProcess:
    """One ``invoke serve`` server in a child process: :meth:`start` returns once it answers, :meth:`stop` ends it
    (SIGTERM; graceful) and returns the child's result. ``log_path``: where its output goes (default: this
    terminal). ``env``: extra environment variables for the child."""

    def __init__(self, plan: ServePlan, log_path: Path | None = None, env: dict[str, str] | None = None):
        self.plan = plan
        self.log_path = Path(log_path) if log_path else None
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        if not self.url:
            raise ServeError("The server is not running.")
        return self.url + "/v1"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = READY_TIMEOUT) -> "ServerProcess":
        self._tmp = tempfile.TemporaryDirectory(prefix="slmops-serve-")
        tmp = Path(self._tmp.name)
        self._ready, self._result, req = tmp / "ready.json", tmp / "result.json", tmp / "request.json"
        req.write_text(json.dumps({"plan": self.plan.to_json(), "ready_file": str(self._ready)}), encoding="utf-8")
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(worker_command("scripts.serve.server:serve_job", req, self._result),
                                     cwd=str(settings.REPO_ROOT), env=worker_env(self.env), stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + timeout
        while not self._ready.is_file():
            if self.proc.poll() is not None:
                raise ServeError(f"The server for {self.plan.model_id} did not start: {self._failure()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"The server for {self.plan.model_id} did not answer within {timeout:.0f} s."
                                 f"{self._log_tail()}")
            time.sleep(0.05)
        self.url = json.loads(self._ready.read_text(encoding="utf-8"))["url"]
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self) -> dict:
        """Block until the server exits on its own (e.g. Ctrl-C in its terminal); return its result."""
        self.proc.wait()
        return self._finish()

    def stop(self, timeout: float = STOP_TIMEOUT) -> dict:
        """Stop gracefully (SIGTERM: in-flight requests finish, the runtime closes); kill after ``timeout``."""
        if self.proc is None:
            return {}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._close()
                raise ServeError(f"The server for {self.plan.model_id} did not stop within {timeout:.0f} s and was "
                                 f"killed.{self._log_tail()}") from None
        return self._finish()

    def _finish(self) -> dict:
        try:
            if self.proc.returncode != 0:
                raise ServeError(f"The server for {self.plan.model_id} failed: {self._failure()}")
            return self._payload().get("result", {})
        finally:
            self._close()

    def _payload(self) -> dict:
        try:
            return json.loads(self._result.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _failure(self) -> str:
        payload = self._payload()
        if payload.get("error"):
            return payload["error"] + self._log_tail()
        return f"it exited with code {self.proc.returncode} without a result.{self._log_tail()}"

    def _log_tail(self) -> str:
        if self.log_path and self.log_path.is_file():
            text = tail(self.log_path.read_bytes())
            return f"\nServer log ({self.log_path}), tail:\n{text}" if text else ""
        return ""

    def _close(self) -> None:
        self.url = None
        if self._log:
            self._log.close()
            self._log = None
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "ServerProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        if self.running():
            self.stop()
        else:
            self._close()


def usage_lines(plan: ServePlan, base: str) -> list[str]:
    """How to point an app at the server (printed when it is ready)."""
    body = json.dumps({"model": plan.model_id, "messages": [{"role": "user", "content": "Hello"}]})
    return [f"OpenAI base URL: {base}   model: {plan.model_id}   (any API key)",
            f"  curl {base}/chat/completions -H 'Content-Type: application/json' -d '{body}'",
            f"  python: OpenAI(base_url=\"{base}\", api_key=\"local\").chat.completions.create("
            f"model=\"{plan.model_id}\", messages=[...])"]


def run_server(plan: ServePlan, announce: Callable[[str], None] = print) -> dict:
    """``invoke serve`` in the foreground: start the server, print where it is, serve until Ctrl-C, stop it."""
    if not is_loopback(plan.host):
        log.warning("Serving on %s: the endpoint is reachable from other machines and has no authentication.",
                    plan.host)
    server = ServerProcess(plan)
    try:
        with stop_on_sigterm():
            server.start()
            for line in usage_lines(plan, server.base_url):
                announce(line)
            announce("Ctrl-C stops the server (SIGTERM too); requests in flight finish first.")
            return server.wait()
    except KeyboardInterrupt:  # Ctrl-C reached both processes; the server is already shutting down
        return server.stop()
    except Terminated:  # SIGTERM to this process: stop the server gracefully, remove our temporary folder, exit 0
        return {**server.stop(), "stopped_by": "SIGTERM"}
    finally:
        if server.running():
            server.stop()


class Terminated(Exception):
    """SIGTERM reached `invoke serve` (a service manager, ``kill``, a container stop)."""


@contextlib.contextmanager
def stop_on_sigterm():
    """Turn SIGTERM into :class:`Terminated` for the block. Without it SIGTERM ended `invoke serve` at once: the server
    process lost its parent mid-request and the temporary folder of the server's files stayed behind."""
    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one graceful stop; a second SIGTERM changes nothing
        raise Terminated()
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
