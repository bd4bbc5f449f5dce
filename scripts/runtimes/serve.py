"""`invoke serve`: the installed model behind a standard OpenAI endpoint (``http://HOST:PORT/v1``), served by
Foundry Local's own web service.

What foundry-local-sdk 2.2.1 offers, measured on Linux (README "Serving"): its web service serves models of the
LOCAL catalog (ours) under the undocumented prefix ``/catalogs/local`` once they are loaded in the serving process,
with OpenAI JSON, SSE streaming, ``usage``, ``stop``, ``max_tokens``, ``temperature``, ``top_p``, and correct
answers under concurrent requests. What it lacks, and this module's thin layer (Starlette on uvicorn) adds:

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
:mod:`scripts.workers`), never beside ``onnxruntime_genai``.
"""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from scripts import settings
from scripts.errors import FoundryError, ServeError
from scripts.runtimes import foundry_sdk
from scripts.runtimes.foundry_api import validate_model_dir, validate_model_id
from scripts.workers import tail, worker_command, worker_env

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5272
UPSTREAM_BIND = "http://127.0.0.1:0"  # Foundry's own service: loopback, any free port, reached only by the layer
UPSTREAM_TIMEOUT = 600.0  # seconds the layer waits for the runtime (per read while streaming)
READY_TIMEOUT = 180.0
STOP_TIMEOUT = 30.0
ROLES = ("system", "user", "assistant", "developer", "tool")
CHAT_PATH = "/v1/chat/completions"


# ----- planning (pure) --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServePlan:
    """What one server serves, where. ``defaults`` are the recipe's generation settings applied to requests that
    omit them; ``max_length`` caps the default ``max_tokens`` (``genai_config.json`` ``search.max_length``)."""

    cache_dir: str
    model_dir: str
    model_id: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    defaults: dict[str, Any] = field(default_factory=dict)
    max_length: int | None = None

    @property
    def alias(self) -> str:
        return self.model_id.split(":")[0]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ServePlan":
        return cls(**data)


def generation_defaults(genai_config: dict[str, Any]) -> dict[str, Any]:
    """OpenAI request fields that reproduce ``genai_config.json`` ``search`` (what ``package`` wrote from the recipe):
    ``temperature`` 0 (greedy) when ``do_sample`` is false or absent, else its ``temperature``, ``top_p`` and
    ``top_k`` (the runtime reads ``top_k`` from ``metadata``; see :func:`apply_defaults`)."""
    search = genai_config.get("search", {}) or {}
    if not search.get("do_sample"):
        return {"temperature": 0.0}
    out: dict[str, Any] = {}
    for key, cast in (("temperature", float), ("top_p", float), ("top_k", int)):
        if search.get(key) is not None:
            out[key] = cast(search[key])
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """The host as it goes into a URL a client can use (a wildcard bind is reached through loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def base_url(host: str, port: int) -> str:
    """The OpenAI base URL clients use: ``http://HOST:PORT/v1``."""
    return f"http://{url_host(host)}:{port}/v1"


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
    return ServePlan(cache_dir=str(Path(cache_dir).resolve()), model_dir=str(model_dir.resolve()), model_id=model_id,
                     host=host, port=port, defaults=generation_defaults(genai_config),
                     max_length=min(int(v) for v in limits) if limits else None)


# ----- OpenAI request checks and errors (pure) ---------------------------------------------------------------------
class ApiError(Exception):
    """An OpenAI-style error answer: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, else a 400."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"We could not parse the JSON body of your request ({exc}); send a JSON object with "
                   "Content-Type: application/json.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _bad(f"The request body must be a JSON object, not {type(body).__name__}.", code="invalid_json")
    return body


def resolve_model(requested: Any, model_id: str) -> str:
    """The served id for ``requested`` (the id, or the bare name before ``:``), else a 404 like OpenAI's."""
    if not isinstance(requested, str) or not requested:
        raise _bad("You must provide a model parameter (the id GET /v1/models lists).", param="model")
    if requested in (model_id, model_id.split(":")[0]):
        return model_id
    raise ApiError(404, f"The model '{requested}' does not exist on this server; it serves '{model_id}' "
                        "(GET /v1/models).", param="model", code="model_not_found")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_chat_request(body: dict[str, Any], model_id: str) -> dict[str, Any]:
    """Validate a chat completion request (the checks the runtime skips) and return it ready for the runtime:
    ``model`` resolved, ``null`` options dropped, a top-level ``top_k`` moved to ``metadata.top_k``."""
    body = {k: v for k, v in body.items() if v is not None}
    body["model"] = resolve_model(body.get("model"), model_id)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array of {role, content} objects.", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with 'role' and 'content'.", param=f"messages.[{i}]")
        if m.get("role") not in ROLES:
            raise _bad(f"messages[{i}].role is {m.get('role')!r}; expected one of {', '.join(ROLES)}.",
                       param=f"messages.[{i}].role")
        content = m.get("content")
        if not isinstance(content, (str, list)) and not (m["role"] == "assistant" and content is None):
            raise _bad(f"messages[{i}].content must be a string or an array of content parts.",
                       param=f"messages.[{i}].content")
    for key in ("max_tokens", "max_completion_tokens"):
        if key in body and (not _is_int(body[key]) or body[key] < 1):
            raise _bad(f"'{key}' must be an integer >= 1, got {body[key]!r}.", param=key)
    if "temperature" in body and (not _is_number(body["temperature"]) or not 0 <= body["temperature"] <= 2):
        raise _bad(f"'temperature' must be a number from 0 to 2, got {body['temperature']!r}.", param="temperature")
    if "top_p" in body and (not _is_number(body["top_p"]) or not 0 < body["top_p"] <= 1):
        raise _bad(f"'top_p' must be a number in (0, 1], got {body['top_p']!r}.", param="top_p")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list)
                                                           and all(isinstance(s, str) and s for s in stop))):
        raise _bad(f"'stop' must be a string or an array of non-empty strings, got {stop!r}.", param="stop")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise _bad(f"'stream' must be true or false, got {body['stream']!r}.", param="stream")
    if "n" in body and body["n"] != 1:
        raise _bad(f"'n' = {body['n']!r} is not supported: the Foundry Local runtime generates one choice per "
                   "request; send n = 1 (or leave it out) and repeat the request.", param="n")
    if "top_k" in body:
        top_k = body.pop("top_k")
        if not _is_int(top_k) or top_k < 1:
            raise _bad(f"'top_k' must be an integer >= 1, got {top_k!r}.", param="top_k")
        body["metadata"] = {**(body.get("metadata") or {}), "top_k": str(top_k)}
    return body


def needs_max_tokens(body: dict[str, Any]) -> bool:
    return "max_tokens" not in body and "max_completion_tokens" not in body


def apply_defaults(body: dict[str, Any], defaults: dict[str, Any], prompt_tokens: int | None = None,
                   context_limit: int | None = None, max_length: int | None = None) -> dict[str, Any]:
    """Fill what the client left out: the recipe's sampling settings (``defaults``, from
    :func:`generation_defaults`; ``top_k`` goes to ``metadata.top_k``), and ``max_tokens`` = the rest of the context
    (``min(context_limit, max_length) - prompt_tokens``, at least 1 so that an over-long prompt gets the runtime's
    own over-context error)."""
    out = dict(body)
    for key, value in defaults.items():
        if key == "top_k":
            meta = dict(out.get("metadata") or {})
            meta.setdefault("top_k", str(value))
            out["metadata"] = meta
        else:
            out.setdefault(key, value)
    if needs_max_tokens(out) and prompt_tokens is not None and context_limit:
        limit = min(context_limit, max_length) if max_length else context_limit
        out["max_tokens"] = max(1, limit - prompt_tokens)
    return out


_CONTEXT_MARKERS = ("maximum context length", "context_length")
# "Invalid request: search_options.cc:108 int fl::ValidateGeneratorRequestBudget(int64_t, int, int) request requires…":
# the runtime's message keeps its C++ source location in front; clients get the sentence.
_SOURCE_PREFIX = re.compile(r"^(?:Invalid request: )?[\w./-]+\.(?:cc|cpp|h):\d+ .*?\) ")


def runtime_error(status: int, text: str) -> ApiError:
    """An error answer of Foundry's service as an OpenAI error: its JSON passed on (an over-context refusal gets
    ``code: context_length_exceeded``, a missing model ``model_not_found``), its plain-text ones wrapped."""
    message, type_, param, code = text.strip(), None, None, None
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        err = doc["error"]
        message = str(err.get("message") or message)
        type_, param, code = err.get("type"), err.get("param"), err.get("code")
    elif text.startswith("server=") and "message=" in text:  # the service's plain-text 404/405 (oatpp)
        message = text.split("message=", 1)[1].strip()
    message = _SOURCE_PREFIX.sub("", message)
    if any(m in message for m in _CONTEXT_MARKERS):
        status, code, param = 400, code or "context_length_exceeded", param or "messages"
    elif status == 404 and "Model not found" in message:
        code, param = code or "model_not_found", param or "model"
    return ApiError(status, message or f"Foundry Local answered {status} without a message.", type_, param, code)


def sse_error(event: bytes) -> ApiError | None:
    """The error an SSE event carries (``data: {"error": …}``), if it is one."""
    for line in event.decode("utf-8", errors="replace").splitlines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            if payload == "[DONE]":
                return None
            try:
                doc = json.loads(payload)
            except ValueError:
                return None
            if isinstance(doc, dict) and "error" in doc:
                status = 400 if (doc["error"] or {}).get("type") == "invalid_request_error" else 500
                return runtime_error(status, payload)
            return None
    return None


# ----- the HTTP layer (runs in the server process) -----------------------------------------------------------------
def build_app(plan: ServePlan, upstream: str, count_prompt: Callable[[dict], tuple[int, int]]):
    """The Starlette app: ``/v1/models``, ``/v1/models/{id}``, ``/v1/chat/completions`` forwarded to Foundry's
    service at ``upstream`` (its ``/catalogs/local`` base), ``/health``; everything else an OpenAI-style 404/405.
    ``count_prompt(body)`` returns ``(prompt tokens, context limit)`` for the default ``max_tokens``."""
    import anyio
    import httpx2 as httpx
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        timeout = httpx.Timeout(UPSTREAM_TIMEOUT, connect=10.0)
        # A fresh loopback connection per request: on a kept-alive one, Foundry's service (which does not set
        # TCP_NODELAY) held each stream ~40 ms for a delayed ACK (TTFT 46 ms kept-alive vs 5 ms fresh, measured).
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=upstream, timeout=timeout, limits=limits) as client:
            state["client"] = client
            yield

    def error_response(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def upstream_call(method: str, path: str, **kw):
        try:
            return await state["client"].request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ApiError(502, f"The Foundry Local runtime did not answer: {exc}") from exc

    async def model_entry() -> dict:
        r = await upstream_call("GET", f"/v1/models/{plan.model_id}")
        if r.status_code != 200:
            raise runtime_error(r.status_code, r.text)
        return r.json()

    async def health(request):
        return JSONResponse({"status": "ok", "model": plan.model_id, "base_url": "/v1"})

    async def list_models(request):
        try:
            return JSONResponse({"object": "list", "data": [await model_entry()]})
        except ApiError as exc:
            return error_response(exc)

    async def get_model(request):
        try:
            resolve_model(request.path_params["model"], plan.model_id)
            return JSONResponse(await model_entry())
        except ApiError as exc:
            return error_response(exc)

    async def chat(request):
        try:
            body = check_chat_request(parse_json_body(await request.body()), plan.model_id)
            prompt_tokens = context_limit = None
            if needs_max_tokens(body):
                try:
                    prompt_tokens, context_limit = await anyio.to_thread.run_sync(count_prompt, body)
                except FoundryError as exc:
                    raise ApiError(500, str(exc)) from exc
            body = apply_defaults(body, plan.defaults, prompt_tokens, context_limit, plan.max_length)
            if body.get("stream"):
                return await stream_chat(body)
            r = await upstream_call("POST", CHAT_PATH, json=body)
            if r.status_code != 200:
                raise runtime_error(r.status_code, r.text)
            return Response(r.content, media_type="application/json")
        except ApiError as exc:
            return error_response(exc)

    async def stream_chat(body: dict):
        client = state["client"]
        try:
            resp = await client.send(client.build_request("POST", CHAT_PATH, json=body), stream=True)
        except httpx.HTTPError as exc:
            raise ApiError(502, f"The Foundry Local runtime did not answer: {exc}") from exc
        chunks = resp.aiter_bytes()
        head = b""
        try:
            if resp.status_code != 200:
                raise runtime_error(resp.status_code, (await resp.aread()).decode("utf-8", errors="replace"))
            async for chunk in chunks:  # the first event decides: an error event becomes an error status
                head += chunk
                if b"\n\n" in head:
                    break
            err = sse_error(head.split(b"\n\n", 1)[0])
            if err is not None:
                raise err
        except BaseException:
            await resp.aclose()
            raise

        async def relay():
            try:
                yield head
                async for chunk in chunks:
                    yield chunk
            finally:
                await resp.aclose()

        return StreamingResponse(relay(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def completions(request):
        return error_response(ApiError(
            404, f"{plan.model_id} is a chat model: the Foundry Local runtime serves chat completions only. Use "
                 "POST /v1/chat/completions (client.chat.completions.create).", code="unsupported_endpoint"))

    async def http_error(request, exc: HTTPException):
        if exc.status_code == 404:
            message = f"Unknown route {request.method} {request.url.path}; this server serves GET /v1/models and " \
                      f"POST {CHAT_PATH}."
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        else:
            message = str(exc.detail)
        return error_response(ApiError(exc.status_code, message))

    routes = [Route("/health", health), Route("/", health), Route("/v1/models", list_models),
              Route("/v1/models/{model:path}", get_model), Route(CHAT_PATH, chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


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
    """Worker entry (``scripts.workers``): register and load the model, start Foundry's web service on loopback,
    serve the OpenAI layer on ``plan.host:plan.port`` until SIGINT/SIGTERM (or the parent process goes away),
    then stop everything. Writes ``{"url", "base_url", "pid"}`` to ``request["ready_file"]`` once listening."""
    import uvicorn

    from scripts.fileops import write_text_atomic

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

        config = uvicorn.Config(app, log_config=None, access_log=True, timeout_graceful_shutdown=10,
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
        self.proc = subprocess.Popen(worker_command("scripts.runtimes.serve:serve_job", req, self._result),
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
        server.start()
        for line in usage_lines(plan, server.base_url):
            announce(line)
        announce("Ctrl-C stops the server.")
        return server.wait()
    except KeyboardInterrupt:  # Ctrl-C reached both processes; the server is already shutting down
        return server.stop()
    finally:
        if server.running():
            server.stop()


# ----- an OpenAI client with timings (for `serve --check` and the bench's HTTP row) --------------------------------
@dataclass
class HttpAnswer:
    """One reply over HTTP: text, when it started (``time.perf_counter``), when each content piece arrived, and the
    server's ``usage`` counts."""

    text: str
    start: float
    token_times: list[float]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    seconds: float

    @property
    def first_token_seconds(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None


def openai_client(base: str, timeout: float = UPSTREAM_TIMEOUT):
    """The official ``openai`` client on ``base`` (no retries: a failure is a finding)."""
    from openai import OpenAI
    return OpenAI(base_url=base, api_key="slmops-local", timeout=timeout, max_retries=0)


def stream_answer(client, model_id: str, messages: list[dict], **options: Any) -> HttpAnswer:
    """Stream one reply (``stream_options.include_usage``), timing every content piece."""
    start = time.perf_counter()
    times, parts, usage, finish = [], [], None, None
    stream = client.chat.completions.create(model=model_id, messages=messages, stream=True,
                                            stream_options={"include_usage": True}, **options)
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                times.append(time.perf_counter())
                parts.append(choice.delta.content)
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    return HttpAnswer("".join(parts), start, times, usage.prompt_tokens if usage else 0,
                      usage.completion_tokens if usage else len(times), finish, end - start)


def complete_answer(client, model_id: str, messages: list[dict], **options: Any) -> HttpAnswer:
    """One non-streamed reply."""
    start = time.perf_counter()
    r = client.chat.completions.create(model=model_id, messages=messages, **options)
    end = time.perf_counter()
    return HttpAnswer(r.choices[0].message.content or "", start, [], r.usage.prompt_tokens if r.usage else 0,
                      r.usage.completion_tokens if r.usage else 0, r.choices[0].finish_reason, end - start)
