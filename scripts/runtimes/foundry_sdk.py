"""The Foundry Local runtime in this process, through ``foundry-local-sdk`` 2.x (Linux, and anywhere without the
``foundry`` CLI): start the manager, register a model in the LOCAL catalog, load it, stream replies.

Loads ``libfoundry_local.so`` (and its GenAI library) into the calling process: the pipeline, which imports
``onnxruntime_genai`` for Olive, reaches it only through a worker (:func:`check_job`, via
:func:`scripts.runtimes.foundry.check_model`). What was measured with 2.2.1 is in :mod:`scripts.runtimes.foundry`.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from scripts.core.errors import FoundryError
from scripts.runtimes.heap import one_heap_for_all_threads
from scripts.runtimes.foundry_api import (REGISTRY_FILE, Answer, CheckResult, inference_model_name, runtime_dirs,
                                          search_options_from_genai_config, validate_messages, validate_model_dir,
                                          validate_model_id)

log = logging.getLogger(__name__)

APP_NAME = "slmops-deploy"
TASK = "chat-completion"
LOCAL_ROUTES = "/catalogs/local"  # where Foundry's web service mounts the LOCAL catalog's OpenAI routes


def _sdk():
    try:
        import foundry_local_sdk
    except ImportError as exc:  # pragma: no cover - pinned in requirements
        raise FoundryError(
            f"foundry-local-sdk is not importable ({exc}); install the pinned requirements "
            "(pip install -r requirements.txt).") from exc
    return foundry_local_sdk


def _warn_if_genai_loaded() -> None:
    if "onnxruntime_genai" in sys.modules:
        log.warning("onnxruntime_genai is imported in this process; loading Foundry Local's own GenAI "
                    "library beside it is untested. Use check_model(), which runs a worker process.")


def open_manager(cache_dir: Path, logs_dir: Path | None = None, app_data_dir: Path | None = None,
                 web_url: str | None = None):
    """Return the process's ``FoundryLocalManager`` for ``cache_dir`` (the SDK allows one per process).

    A manager for another cache dir (or another ``web_url``) is closed first. ``web_url`` is where
    :func:`start_web_service` will bind Foundry's own web service (``http://127.0.0.1:0``: any free loopback
    port). Never touches the public catalog.
    """
    sdk = _sdk()
    _warn_if_genai_loaded()
    one_heap_for_all_threads()
    cache_dir = Path(cache_dir).resolve()
    logs, app_data = runtime_dirs(cache_dir, logs_dir, app_data_dir)
    current = sdk.FoundryLocalManager.instance
    if current is not None:
        current_web = current.config.web.urls if current.config.web is not None else None
        if Path(current.config.model_cache_dir or "").resolve() == cache_dir and web_url in (None, current_web):
            return current
        log.info("Closing the Foundry Local manager for %s", current.config.model_cache_dir)
        current.close()
    for d in (cache_dir, logs, app_data):
        d.mkdir(parents=True, exist_ok=True)
    config = sdk.Configuration(
        app_name=APP_NAME,
        model_cache_dir=str(cache_dir),
        logs_dir=str(logs),
        app_data_dir=str(app_data),
        log_level=sdk.LogLevel.WARNING,
        disable_nonessential_telemetry=True,
        web=sdk.Configuration.WebService(urls=web_url) if web_url else None,
    )
    try:
        sdk.FoundryLocalManager.initialize(config)
    except Exception as exc:
        raise FoundryError(f"Foundry Local did not start (cache {cache_dir}): {exc}. "
                           f"Runtime logs: {logs}") from exc
    log.debug("Foundry Local manager started: cache=%s logs=%s", cache_dir, logs)
    return sdk.FoundryLocalManager.instance


def close_manager() -> None:
    """Unload everything and close this process's manager (idempotent)."""
    sdk = sys.modules.get("foundry_local_sdk")
    if sdk is not None and sdk.FoundryLocalManager.instance is not None:
        sdk.FoundryLocalManager.instance.close()


def local_catalog(manager):
    return manager.get_catalog(_sdk().CatalogType.LOCAL)


def ensure_registered(catalog, model_dir: Path, model_id: str,
                      display_name: str | None = None) -> tuple[Any, str]:
    """Register ``model_dir`` as ``model_id`` in the local catalog, idempotently.

    Returns ``(model, status)`` with status ``"unchanged"``, ``"registered"`` or ``"replaced"``. A model
    already registered under this id with another path is unloaded and unregistered first (the catalog
    never deletes model files).
    """
    sdk = _sdk()
    validate_model_id(model_id)
    validate_model_dir(model_dir)
    model_dir = Path(model_dir).resolve()
    status = "registered"
    existing = catalog.get_model_variant(model_id)
    if existing is not None:
        old = Path(existing.get_path())
        if old.resolve() == model_dir:
            log.debug("%s already registered at %s", model_id, model_dir)
            return existing, "unchanged"
        log.info("Re-registering %s: %s -> %s", model_id, old, model_dir)
        try:
            if existing.is_loaded:
                existing.unload()
            catalog.unregister_model(model_id)
        except Exception as exc:
            raise FoundryError(f"Could not unregister the old {model_id} (at {old}): {exc}") from exc
        status = "replaced"
    if display_name is None:
        display_name = inference_model_name(model_dir) or model_id.split(":")[0]
    try:
        with sdk.ModelInfoBuilder() as metadata:
            metadata.set_string_property("task", TASK)
            metadata.set_string_property("display_name", display_name)
            model = catalog.register_model(model_path=str(model_dir), model_id=model_id, metadata=metadata)
    except Exception as exc:
        raise FoundryError(f"Foundry Local refused to register {model_dir} as {model_id}: {exc}") from exc
    log.info("%s %s at %s", status.capitalize(), model_id, model_dir)
    return model, status


def load_model(model) -> float:
    """Load ``model``; return seconds taken."""
    t0 = time.perf_counter()
    try:
        model.load()
    except Exception as exc:
        raise FoundryError(
            f"Foundry Local could not load {model.id} from {model.get_path()}: {exc}. Check that the "
            "folder is a complete ONNX Runtime GenAI model (genai_config.json ids not null, "
            "tokenizer files present).") from exc
    return time.perf_counter() - t0


def start_web_service(manager) -> str:
    """Start Foundry's own OpenAI-style web service; return the base URL of its LOCAL-catalog routes.

    In 2.2.1 the service mounts every route twice: at the root for the public catalog, and under
    ``/catalogs/local`` for the LOCAL catalog that :func:`ensure_registered` writes to (so
    ``<returned>/v1/chat/completions``). A model must be loaded in this process before it answers there.
    """
    try:
        manager.start_web_service()
    except Exception as exc:
        raise FoundryError(f"Foundry Local's web service did not start: {exc}") from exc
    if not manager.urls:
        raise FoundryError("Foundry Local's web service started but reported no URL.")
    return manager.urls[0].rstrip("/") + LOCAL_ROUTES


def preflight_openai(model, body: dict) -> tuple[int, int]:
    """``(prompt tokens, context limit)`` of an OpenAI chat request body, as the runtime counts them (its chat
    template and tokenizer; no generation). Thread-safe beside requests being served; ~0.3 ms."""
    sdk = _sdk()
    try:
        with sdk.ChatSession(model) as session, sdk.Request() as request:
            request.add_item(sdk.TextItem(json.dumps(body), sdk.TextItemType.OPENAI_JSON))
            result = session.preflight_request(request)
    except Exception as exc:
        raise FoundryError(f"Foundry Local could not count the prompt tokens of a request to {model.id}: "
                           f"{exc}") from exc
    return result.prompt_tokens, result.context_limit_tokens


def _text_of(item, sdk) -> str:
    if isinstance(item, sdk.TextItem):
        return item.text
    if isinstance(item, sdk.MessageItem):
        return "".join(p.text for p in item.parts if isinstance(p, sdk.TextItem))
    return ""


def _build_request(messages: Sequence[dict], search: dict[str, Any], sdk):
    validate_messages(messages)
    role = {"system": sdk.MessageRole.SYSTEM, "user": sdk.MessageRole.USER,
            "assistant": sdk.MessageRole.ASSISTANT, "developer": sdk.MessageRole.DEVELOPER}
    request = sdk.Request()
    for m in messages:
        request.add_item(sdk.MessageItem(role[m["role"]], m["content"]))
    request.set_options(sdk.RequestOptions(search=sdk.SearchOptions(**search)))
    return request


def stream_reply(model, messages: Sequence[dict], search: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Stream one reply in a fresh ``ChatSession``: yields ``("text", str)`` items, then
    ``("usage", TokenUsage | None)`` once the reply is complete."""
    sdk = _sdk()
    try:
        session = sdk.ChatSession(model)
    except Exception as exc:
        raise FoundryError(f"Could not open a chat session on {model.id}: {exc}") from exc
    with session:
        session.set_streaming(True)
        with _build_request(messages, search, sdk) as request:
            try:
                with session.process_streaming_request(request) as stream:
                    for item in stream:
                        text = _text_of(item, sdk)
                        if text:
                            yield "text", text
                    with stream.final_response as final:
                        usage = final.get_usage()
            except sdk.FoundryLocalException as exc:
                raise FoundryError(f"{model.id} failed to answer: {exc}") from exc
    yield "usage", usage


def answer(model, messages: Sequence[dict], search: dict[str, Any]) -> Answer:
    """Answer one conversation, timing the whole reply and its first text."""
    t0 = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    tokens: int | None = None
    for kind, value in stream_reply(model, messages, search):
        if kind == "text":
            if first is None:
                first = time.perf_counter() - t0
            parts.append(value)
        else:
            tokens = value.completion_tokens if value is not None else None
    return Answer(text="".join(parts), seconds=time.perf_counter() - t0,
                  first_token_seconds=first, tokens=tokens)


def run_check_in_process(cache_dir: Path, model_dir: Path, model_id: str,
                         conversations: Sequence[Sequence[dict]], max_tokens: int = 64,
                         search: dict[str, Any] | None = None, logs_dir: Path | None = None,
                         app_data_dir: Path | None = None) -> CheckResult:
    """The worker's job: register (idempotent), confirm listed, load, answer each conversation, unload.

    Loads Foundry Local's native library into the calling process; use :func:`check_model` from a
    process that imports ``onnxruntime_genai``.
    """
    t_start = time.perf_counter()
    validate_model_id(model_id)
    genai_config = validate_model_dir(model_dir)
    opts = search_options_from_genai_config(genai_config, max_tokens, search)
    for conv in conversations:
        validate_messages(conv)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    manager = open_manager(cache_dir, logs_dir, app_data_dir)
    catalog = local_catalog(manager)
    timings["init"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, status = ensure_registered(catalog, model_dir, model_id)
    timings["register"] = time.perf_counter() - t0
    listed = any(m.id == model_id for m in catalog.list_models())
    if not listed:
        raise FoundryError(f"{model_id} was registered but is not listed in the local catalog "
                           f"({Path(cache_dir) / REGISTRY_FILE}).")
    load_seconds = load_model(model)
    answers = [answer(model, conv, opts) for conv in conversations]
    t0 = time.perf_counter()
    try:
        model.unload()
    except Exception as exc:  # an unload failure does not invalidate the answers
        log.warning("Unloading %s failed: %s", model_id, exc)
    timings["unload"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return CheckResult(model_id=model_id, listed=listed, load_seconds=load_seconds, answers=answers,
                       registration=status, timings=timings,
                       logs_dir=runtime_dirs(Path(cache_dir).resolve(), logs_dir, app_data_dir)[0])


class LiveChat:
    """One loaded model kept for an interactive chat: :meth:`stream` answers a whole conversation at a time
    (each call uses a fresh session; pass the history), :meth:`count_tokens` and :attr:`context` give the runtime's
    own token budget (``ChatSession.preflight_request``: its chat template and tokenizer, its context limit, which
    is ``genai_config.json`` ``model.context_length``). Use as a context manager: leaving closes the runtime.
    Do not use in a process that has imported ``onnxruntime_genai``."""

    def __init__(self, cache_dir: Path, model_dir: Path, model_id: str):
        self.manager = open_manager(cache_dir)
        self.model, _ = ensure_registered(local_catalog(self.manager), model_dir, model_id)
        if not self.model.is_loaded:
            load_model(self.model)
        self.genai_config = validate_model_dir(model_dir)
        self._budget_session = None

    def preflight(self, messages: Sequence[dict]):
        """The runtime's ``RequestPreflightResult`` for ``messages`` (prompt tokens, context limit)."""
        sdk = _sdk()
        if self._budget_session is None:
            self._budget_session = sdk.ChatSession(self.model)
        with _build_request(messages, {"max_output_tokens": 1}, sdk) as request:
            try:
                return self._budget_session.preflight_request(request)
            except sdk.FoundryLocalException as exc:
                raise FoundryError(f"{self.model.id} could not measure a prompt: {exc}") from exc

    def count_tokens(self, messages: Sequence[dict]) -> int:
        """Prompt tokens of ``messages`` as the runtime will build the prompt (chat template included)."""
        return self.preflight(messages).prompt_tokens

    @property
    def context(self) -> int:
        """The model's context limit in tokens (prompt + reply), as the runtime enforces it."""
        return self.preflight([{"role": "user", "content": "x"}]).context_limit_tokens

    def stream(self, messages: Sequence[dict], max_tokens: int = 256,
               search: dict[str, Any] | None = None) -> Iterator[str]:
        opts = search_options_from_genai_config(self.genai_config, max_tokens, search)
        for kind, value in stream_reply(self.model, messages, opts):
            if kind == "text":
                yield value

    def __enter__(self) -> "LiveChat":
        return self

    def __exit__(self, *exc) -> None:
        if self._budget_session is not None:
            self._budget_session.__exit__(None, None, None)
        close_manager()


def check_job(request: dict) -> dict:
    """Worker entry (``scripts.core.workers``): :func:`run_check_in_process` on a JSON request, then close the runtime."""
    missing = [k for k in ("cache_dir", "model_dir", "model_id", "conversations") if k not in request]
    if missing:
        raise FoundryError(f"Worker request lacks {', '.join(missing)}.")
    try:
        result = run_check_in_process(
            cache_dir=Path(request["cache_dir"]), model_dir=Path(request["model_dir"]),
            model_id=request["model_id"], conversations=request["conversations"],
            max_tokens=int(request.get("max_tokens", 64)), search=request.get("search"),
            logs_dir=Path(request["logs_dir"]) if request.get("logs_dir") else None,
            app_data_dir=Path(request["app_data_dir"]) if request.get("app_data_dir") else None)
        return result.to_json()
    finally:
        try:
            close_manager()
        except Exception as exc:  # the answer is already made
            log.warning("Closing Foundry Local failed: %s", exc)
