"""Talk to the real Foundry Local runtime: register an installed model, confirm it is listed, load it, answer.

Two back ends, chosen by :func:`foundry_cli_available`:

- **SDK (Linux, and anywhere without the ``foundry`` CLI)**: ``foundry-local-sdk`` 2.x runs the runtime
  in-process (``libfoundry_local.so``). Because the pipeline process also imports ``onnxruntime_genai``
  (for Olive) and the two GenAI native libraries should not share a process, :func:`check_model` runs
  the work in a subprocess (``python -m scripts.foundry_worker``) and returns a typed
  :class:`CheckResult`. :func:`chat_stream` runs in-process, for an interactive chat in a process that
  has not imported ``onnxruntime_genai``.
- **v1 CLI (Windows/macOS)**: ``foundry cache location``, ``foundry cache ls``, ``foundry model load``,
  ``foundry model run NAME --prompt``. Kept small, in the section "v1 CLI" below, and driven through a
  replaceable command runner so it can be unit-tested without the CLI.

What was measured with foundry-local-sdk 2.2.1 on Linux, offline:

- Only the **public** catalog goes to the network; offline each public call costs ~4 s of retries
  (connection refused retries too; an HTTP error status fails at once). Every call on the **local**
  catalog (list, get, register, unregister) and ``model.load()`` stays off the network. So this module
  never touches the public catalog, and sets ``disable_nonessential_telemetry``.
- ``register_model`` does not copy files: it records ``model_path`` in
  ``<model_cache_dir>/foundry.local.modelinfo.json``. Registering an existing id raises; so we
  compare paths, and on a different path ``unregister_model`` + register again.
- The runtime **samples by default** (it does not take ``do_sample: false`` from ``genai_config.json``)
  and defaults to 2048 output tokens; so generation options are always passed explicitly, built from
  ``genai_config.json`` ``search`` (see :func:`search_options_from_genai_config`).
- A ``ChatSession`` keeps history across requests: one session per conversation.
- The runtime applies the tokenizer's chat template (``tokenizer_config.json`` ``chat_template`` wins
  over ``chat_template.jinja``), not ``inference_model.json`` ``PromptTemplate``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scripts import settings
from scripts.errors import FoundryError

log = logging.getLogger(__name__)

APP_NAME = "slmops-deploy"
WORKER_MODULE = "scripts.foundry_worker"
REGISTRY_FILE = "foundry.local.modelinfo.json"
RUNTIME_DIR_NAME = ".slmops-runtime"  # under the model cache dir: logs/ and app-data/
TASK = "chat-completion"
ROLES = ("system", "user", "assistant", "developer")
_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*:[0-9]+$")


# --------------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One generated reply. ``tokens`` is the runtime's completion-token count."""

    text: str
    seconds: float
    first_token_seconds: float | None
    tokens: int | None


@dataclass
class CheckResult:
    """Outcome of :func:`check_model`.

    ``registration`` is ``"registered"`` (new), ``"unchanged"`` (same id, same path: no-op),
    ``"replaced"`` (same id, different path) or ``"cli"`` (v1 CLI: the cache scanner finds the folder).
    ``timings`` holds the worker's other phases in seconds (``init``, ``register``, ``unload``, ``total``).
    """

    model_id: str
    listed: bool
    load_seconds: float
    answers: list[Answer]
    registration: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    logs_dir: Path | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CheckResult":
        return cls(
            model_id=data["model_id"],
            listed=bool(data["listed"]),
            load_seconds=float(data["load_seconds"]),
            answers=[Answer(**a) for a in data["answers"]],
            registration=data.get("registration", ""),
            timings={k: float(v) for k, v in data.get("timings", {}).items()},
            logs_dir=Path(data["logs_dir"]) if data.get("logs_dir") else None,
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["logs_dir"] = str(self.logs_dir) if self.logs_dir else None
        return d


# --------------------------------------------------------------------------------------------------
# Paths and input validation (no SDK import)
# --------------------------------------------------------------------------------------------------


def foundry_cli_available() -> bool:
    """True when a ``foundry`` executable (the v1 CLI of Windows/macOS) is on PATH."""
    return shutil.which("foundry") is not None


def cache_root() -> Path:
    """Model cache root: ``foundry cache location`` when the CLI exists, else ``SLMOPS_FOUNDRY_CACHE``
    (default ``~/.foundry/cache/models``)."""
    if foundry_cli_available():
        return cli_cache_location()
    return settings.default_foundry_cache()


def runtime_dirs(cache_dir: Path, logs_dir: Path | None = None,
                 app_data_dir: Path | None = None) -> tuple[Path, Path]:
    """(logs_dir, app_data_dir) for the runtime: under ``<cache_dir>/.slmops-runtime/`` unless given."""
    base = Path(cache_dir) / RUNTIME_DIR_NAME
    return (Path(logs_dir) if logs_dir else base / "logs",
            Path(app_data_dir) if app_data_dir else base / "app-data")


def validate_model_id(model_id: str) -> None:
    if not _MODEL_ID_RE.match(model_id or ""):
        raise FoundryError(
            f"Model id {model_id!r} is not of the form '<name>:<version>' (e.g. 'qwen-tiny:1'), which "
            "Foundry Local requires; use letters, digits, '.', '_' or '-' and an integer version.")


def validate_model_dir(model_dir: Path) -> dict[str, Any]:
    """Check that ``model_dir`` is an ONNX Runtime GenAI folder; return its parsed ``genai_config.json``."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FoundryError(f"Model folder {model_dir} does not exist; install the converted model first.")
    cfg_path = model_dir / "genai_config.json"
    if not cfg_path.is_file():
        raise FoundryError(
            f"{model_dir} has no genai_config.json, so Foundry Local cannot load it. Point at the folder "
            "the conversion produced (model.onnx, model.onnx.data, genai_config.json, tokenizer files).")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FoundryError(f"{cfg_path} is not readable JSON ({exc}); re-run the conversion.") from exc
    onnx_name = (cfg.get("model", {}).get("decoder", {}) or {}).get("filename", "model.onnx")
    if not (model_dir / onnx_name).is_file():
        raise FoundryError(
            f"{model_dir} lacks {onnx_name}, which genai_config.json names; re-run the conversion.")
    return cfg


def search_options_from_genai_config(genai_config: dict[str, Any], max_tokens: int,
                                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generation options for the runtime, as ``SearchOptions`` keyword arguments.

    The runtime ignores ``genai_config.json`` ``search`` for sampling (it samples unless told), so we pass
    the file's values explicitly: greedy (``do_sample=False``) when ``do_sample`` is false or absent, else
    ``temperature``/``top_k``/``top_p`` from the file. ``overrides`` (same keys as ``SearchOptions``:
    temperature, top_p, top_k, do_sample, seed, max_output_tokens) win. ``repetition_penalty`` and
    beam search have no equivalent in the runtime's options and are not forwarded.
    """
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise FoundryError(f"max_tokens must be an integer >= 1 (got {max_tokens!r}); the runtime rejects 0.")
    search = genai_config.get("search", {}) or {}
    opts: dict[str, Any] = {"max_output_tokens": max_tokens}
    if search.get("do_sample"):
        opts["do_sample"] = True
        for key, cast in (("temperature", float), ("top_k", int), ("top_p", float)):
            if search.get(key) is not None:
                opts[key] = cast(search[key])
    else:
        opts["do_sample"] = False
    allowed = {"temperature", "top_p", "top_k", "do_sample", "seed", "max_output_tokens"}
    for key, value in (overrides or {}).items():
        if key not in allowed:
            raise FoundryError(f"Unknown generation option {key!r}; allowed: {', '.join(sorted(allowed))}.")
        if value is not None:
            opts[key] = value
    return opts


def validate_messages(messages: Sequence[dict]) -> None:
    if not messages:
        raise FoundryError("A conversation must hold at least one message.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise FoundryError(
                f"Message {i} ({m!r}) must be {{'role': one of {ROLES}, 'content': str}}.")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise FoundryError(
                f"Message {i} is not valid UTF-8 text (undecodable bytes at position {exc.start}); decode "
                "the input as UTF-8 (e.g. errors='replace') before sending it.") from None
    if messages[-1]["role"] not in ("user", "developer"):
        log.warning("Last message has role %r; the model is asked to continue after it anyway.",
                    messages[-1]["role"])


# --------------------------------------------------------------------------------------------------
# SDK back end (in-process). Imports foundry_local_sdk lazily: importing this module stays cheap.
# --------------------------------------------------------------------------------------------------


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


def open_manager(cache_dir: Path, logs_dir: Path | None = None, app_data_dir: Path | None = None):
    """Return the process's ``FoundryLocalManager`` for ``cache_dir`` (the SDK allows one per process).

    A manager for another cache dir is closed first. Never touches the public catalog.
    """
    sdk = _sdk()
    _warn_if_genai_loaded()
    cache_dir = Path(cache_dir).resolve()
    logs, app_data = runtime_dirs(cache_dir, logs_dir, app_data_dir)
    current = sdk.FoundryLocalManager.instance
    if current is not None:
        if Path(current.config.model_cache_dir or "").resolve() == cache_dir:
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
    _CHAT_STATE.clear()


def local_catalog(manager):
    return manager.get_catalog(_sdk().CatalogType.LOCAL)


def registered_path(catalog, model_id: str) -> Path | None:
    """Path a model id is registered with in the local catalog, or None."""
    model = catalog.get_model_variant(model_id)
    return Path(model.get_path()) if model is not None else None


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
        display_name = _inference_model_name(model_dir) or model_id.split(":")[0]
    try:
        with sdk.ModelInfoBuilder() as metadata:
            metadata.set_string_property("task", TASK)
            metadata.set_string_property("display_name", display_name)
            model = catalog.register_model(model_path=str(model_dir), model_id=model_id, metadata=metadata)
    except Exception as exc:
        raise FoundryError(f"Foundry Local refused to register {model_dir} as {model_id}: {exc}") from exc
    log.info("%s %s at %s", status.capitalize(), model_id, model_dir)
    return model, status


def _inference_model_name(model_dir: Path) -> str | None:
    p = Path(model_dir) / "inference_model.json"
    try:
        name = json.loads(p.read_text(encoding="utf-8")).get("Name")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None


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


_CHAT_STATE: dict[str, Any] = {}


def chat_stream(cache_dir: Path, model_dir: Path, model_id: str, messages: Sequence[dict],
                max_tokens: int = 256, search: dict[str, Any] | None = None) -> Iterator[str]:
    """Stream the reply to ``messages`` in-process (for an interactive chat).

    Registers idempotently and keeps the model loaded between calls; call :func:`close_manager` at the
    end. Pass the whole conversation each time (each call uses a fresh session). Do not use in a
    process that has imported ``onnxruntime_genai``.
    """
    key = f"{Path(cache_dir).resolve()}|{Path(model_dir).resolve()}|{model_id}"
    if _CHAT_STATE.get("key") != key:
        manager = open_manager(cache_dir)
        model, _ = ensure_registered(local_catalog(manager), model_dir, model_id)
        if not model.is_loaded:
            load_model(model)
        _CHAT_STATE.update(key=key, model=model,
                           genai_config=validate_model_dir(model_dir))
    opts = search_options_from_genai_config(_CHAT_STATE["genai_config"], max_tokens, search)
    for kind, value in stream_reply(_CHAT_STATE["model"], messages, opts):
        if kind == "text":
            yield value


# --------------------------------------------------------------------------------------------------
# Parent side: run the worker in a subprocess
# --------------------------------------------------------------------------------------------------


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


def check_model(cache_dir: Path, model_dir: Path, model_id: str, conversations: list[list[dict]],
                max_tokens: int = 64, timeout: float = 600, *, search: dict[str, Any] | None = None,
                use_cli: bool | None = None, runner: "Runner | None" = None) -> CheckResult:
    """Register ``model_dir`` as ``model_id`` (idempotent), confirm it is listed, load it and answer
    each conversation (``[{"role": ..., "content": ...}, ...]``), in a worker subprocess.

    With the v1 CLI on PATH (or ``use_cli=True``) the CLI is used instead (see :func:`cli_check_model`).
    Raises :class:`FoundryError` with the worker's cause and stderr tail on any failure.
    """
    if use_cli is None:
        use_cli = foundry_cli_available()
    if use_cli:
        return cli_check_model(model_dir, conversations, timeout=timeout, runner=runner)
    # Fail fast, with the same messages the worker would give, before paying for a subprocess.
    validate_model_id(model_id)
    validate_model_dir(model_dir)
    search_options_from_genai_config({}, max_tokens, search)
    for conv in conversations:
        validate_messages(conv)
    request = {
        "cache_dir": str(Path(cache_dir).resolve()),
        "model_dir": str(Path(model_dir).resolve()),
        "model_id": model_id,
        "conversations": conversations,
        "max_tokens": max_tokens,
        "search": search,
    }
    with tempfile.TemporaryDirectory(prefix="slmops-foundry-") as tmp:
        req_path, res_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req_path.write_text(json.dumps(request), encoding="utf-8")
        cmd = [sys.executable, "-m", WORKER_MODULE, "--input", str(req_path), "--output", str(res_path)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(settings.REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        log.info("Checking %s in Foundry Local (worker process)", model_id)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=str(settings.REPO_ROOT), env=env, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            raise FoundryError(
                f"The Foundry Local worker did not finish within {timeout:.0f} s while checking "
                f"{model_id}; raise the timeout or look at the runtime logs in "
                f"{runtime_dirs(Path(cache_dir))[0]}.\n{_tail(err)}") from None
        log.debug("Worker finished in %.2f s with exit code %d", time.perf_counter() - t0, proc.returncode)
        result = None
        if res_path.is_file():
            try:
                result = json.loads(res_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                result = None
    if result is not None and result.get("ok"):
        return CheckResult.from_json(result["result"])
    stderr = _tail(proc.stderr)
    if result is not None:
        raise FoundryError(f"{result.get('error', 'Foundry Local check failed')}"
                           + (f"\nWorker stderr (tail):\n{stderr}" if stderr else ""))
    raise FoundryError(
        f"The Foundry Local worker exited with code {proc.returncode} without a result while checking "
        f"{model_id} ({model_dir}). Worker stderr (tail):\n{stderr or '(empty)'}")


# --------------------------------------------------------------------------------------------------
# v1 CLI (Windows/macOS). Not available on Linux: exercised by unit tests with a fake runner.
# --------------------------------------------------------------------------------------------------

Runner = Callable[[Sequence[str], float], subprocess.CompletedProcess]


def _default_runner(args: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def _cli(args: Sequence[str], timeout: float = 120, runner: Runner | None = None) -> str:
    cmd = ["foundry", *args]
    try:
        proc = (runner or _default_runner)(cmd, timeout)
    except FileNotFoundError as exc:
        raise FoundryError("The foundry CLI is not on PATH; install Foundry Local or use the SDK.") from exc
    except subprocess.TimeoutExpired as exc:
        raise FoundryError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s.") from exc
    if proc.returncode != 0:
        raise FoundryError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): "
                           f"{_tail(proc.stderr or proc.stdout, 10)}")
    return proc.stdout or ""


def cli_cache_location(runner: Runner | None = None) -> Path:
    """Parse ``foundry cache location`` (prints e.g. ``💾 Cache directory path: C:\\...\\models``)."""
    out = _cli(["cache", "location"], runner=runner)
    for line in reversed(out.strip().splitlines()):
        m = re.search(r"(?:path|location)\s*:\s*(.+)$", line, re.IGNORECASE)
        candidate = (m.group(1) if m else line).strip().strip('"')
        if candidate and (os.sep in candidate or "/" in candidate or "\\" in candidate):
            return Path(candidate)
    raise FoundryError(f"Could not read a path from `foundry cache location`: {out.strip()!r}")


def cli_model_name(model_dir: Path) -> str:
    """The name the v1 CLI lists a cache folder under: ``inference_model.json`` ``Name``."""
    name = _inference_model_name(model_dir)
    if not name:
        raise FoundryError(f"{model_dir}/inference_model.json is missing or has no string 'Name'; the "
                           "Foundry Local CLI only lists folders that have one.")
    return name


def cli_is_listed(name: str, runner: Runner | None = None) -> bool:
    out = _cli(["cache", "ls"], runner=runner)
    return any(re.search(rf"(^|\s){re.escape(name)}(\s|$)", line) for line in out.splitlines())


def cli_check_model(model_dir: Path, conversations: Sequence[Sequence[dict]], timeout: float = 600,
                    runner: Runner | None = None) -> CheckResult:
    """v1 CLI check: listed by ``foundry cache ls``, ``foundry model load``, then one
    ``foundry model run NAME --prompt TEXT`` per conversation (the CLI takes one prompt: the last
    user message; it applies the model's ``PromptTemplate``). Token counts are not reported."""
    validate_model_dir(model_dir)
    name = cli_model_name(model_dir)
    if not cli_is_listed(name, runner):
        raise FoundryError(f"`foundry cache ls` does not list {name}; is {model_dir} inside the folder "
                           "`foundry cache location` prints (as <publisher>/<name>/)?")
    t0 = time.perf_counter()
    _cli(["model", "load", name], timeout=timeout, runner=runner)
    load_seconds = time.perf_counter() - t0
    answers = []
    for conv in conversations:
        validate_messages(conv)
        prompt = next((m["content"] for m in reversed(conv) if m["role"] == "user"), conv[-1]["content"])
        t0 = time.perf_counter()
        out = _cli(["model", "run", name, "--prompt", prompt], timeout=timeout, runner=runner)
        answers.append(Answer(text=out.strip(), seconds=time.perf_counter() - t0,
                              first_token_seconds=None, tokens=None))
    return CheckResult(model_id=name, listed=True, load_seconds=load_seconds, answers=answers,
                       registration="cli")
