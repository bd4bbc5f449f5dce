"""The HTTP layer of `invoke serve` (runs in the server process): a Starlette app serving the standard OpenAI base
URL ``/v1`` in front of Foundry Local's own web service, whose ``/catalogs/local`` routes serve our model. It adds
what the service lacks (see :mod:`scripts.serve.server`): the recipe's defaults, the request checks and OpenAI-style
errors of :mod:`scripts.serve.api`, ``/v1/models`` for the served model only; everything else goes to the
runtime unchanged, and its answers and errors come back unchanged. Starlette and httpx are imported only when the app
is built."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

from scripts.core.errors import FoundryError
from scripts.serve import tools
from scripts.serve.guard import InstalledWatch, check_model_limits, public_error, read_body
from scripts.serve.api import (CHAT_PATH, UPSTREAM_TIMEOUT, ApiError, ServePlan, apply_defaults,
                                        check_chat_request, needs_max_tokens, parse_json_body, resolve_model,
                                        runtime_error, sse_error)



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
    watch = InstalledWatch(plan.model_dir, plan.model_id)

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
        exc = public_error(exc)  # no runtime internals; a runtime failure about a parameter is the client's 400
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
        watch_installed()
        return JSONResponse({"status": "ok", "model": plan.model_id, "base_url": "/v1", **watch.state()})

    def watch_installed() -> None:
        note = watch.check()
        if note:
            logging.getLogger("scripts.serve").warning("%s", note)

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
            watch_installed()
            raw = await read_body(request)
            if raw is None:
                return Response(status_code=400)  # nobody is listening any more
            body = check_chat_request(parse_json_body(raw), plan.model_id)
            check_model_limits(body, plan.vocab_size, plan.controls)
            ctx = None
            if tools.needs_layer(body):
                body, ctx = tools.prepare(body, plan.tools)
            prompt_tokens = context_limit = None
            if needs_max_tokens(body):
                try:
                    prompt_tokens, context_limit = await anyio.to_thread.run_sync(count_prompt, body)
                except FoundryError as exc:
                    raise ApiError(500, str(exc)) from exc
            body = apply_defaults(body, plan.defaults, prompt_tokens, context_limit, plan.max_length)
            if body.get("stream"):
                return await stream_chat(body, ctx)
            r = await upstream_call("POST", CHAT_PATH, json=body)
            if r.status_code != 200:
                raise runtime_error(r.status_code, r.text)
            if ctx is not None:
                return JSONResponse(tools.finish_completion(ctx, r.json()))
            return Response(r.content, media_type="application/json")
        except ApiError as exc:
            return error_response(exc)

    async def stream_chat(body: dict, ctx: "tools.ToolContext | None" = None):
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

        async def rewritten():
            """The runtime's events, one at a time, through the tool/JSON layer; an invalid answer ends the stream
            with an OpenAI error event (the openai client raises it)."""
            rewriter, pending = tools.StreamRewriter(ctx), b""
            try:
                async for chunk in relay():
                    pending += chunk
                    while b"\n\n" in pending:
                        event, pending = pending.split(b"\n\n", 1)
                        for out in rewriter.feed(event):
                            yield out
                for out in rewriter.finish():
                    yield out
            except ApiError as exc:
                yield tools.error_event(exc)

        return StreamingResponse(relay() if ctx is None else rewritten(), media_type="text/event-stream",
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
