"""What both Foundry Local back ends (SDK worker, v1 CLI) share: result types, runtime folders, and the checks
on model ids, model folders, messages and generation options that run before any runtime is touched. Pure."""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scripts.core.errors import FoundryError

log = logging.getLogger(__name__)

REGISTRY_FILE = "foundry.local.modelinfo.json"
RUNTIME_DIR_NAME = ".slmops-runtime"  # under the model cache dir: logs/ and app-data/
ROLES = ("system", "user", "assistant", "developer")
#: Output tokens a Foundry Local SDK 2.2.1 client reserves when it does not say (``ChatSession``, ``ChatClient``, the
#: web service): a request fits only when ``model.context_length`` ≥ prompt + this.
SDK_DEFAULT_OUTPUT_TOKENS = 2048
_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*:[0-9]+$")


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


def runtime_dirs(cache_dir: Path, logs_dir: Path | None = None,
                 app_data_dir: Path | None = None) -> tuple[Path, Path]:
    """(logs_dir, app_data_dir) for the runtime: under ``<cache_dir>/.slmops-runtime/`` unless given."""
    base = Path(cache_dir) / RUNTIME_DIR_NAME
    return (Path(logs_dir) if logs_dir else base / "logs",
            Path(app_data_dir) if app_data_dir else base / "app-data")


#: Free space below which the cache counts as full for the runtime's own files (its logs and registry).
RUNTIME_MIN_FREE = 16 << 20


def runtime_cache(cache_dir: Path) -> Path:
    """The folder to give the Foundry runtime as its ``model_cache_dir``: the cache itself, unless it is read-only.
    The runtime writes its registry, a lock file and logs there (measured, SDK 2.2.1: "FileLock: failed to open
    <cache>/foundry.local.modelinfo.lock" on a read-only cache; "Failed opening file … for writing" for its log on a
    full one); then a writable folder under the user's cache
    (``~/.cache/slmops/read-only-caches/<hash>``) takes that role, and models are registered at their real, read-only
    paths, which the runtime loads from without writing."""
    import hashlib
    import os

    import shutil

    cache_dir = Path(cache_dir)
    runtime = cache_dir / RUNTIME_DIR_NAME
    try:
        full = shutil.disk_usage(cache_dir).free < RUNTIME_MIN_FREE
    except OSError:
        full = False
    if not full and os.access(cache_dir, os.W_OK) and (not runtime.exists() or os.access(runtime, os.W_OK)):
        return cache_dir
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "slmops" / "read-only-caches" / hashlib.sha256(str(cache_dir).encode()).hexdigest()[:16]


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


def default_client_note(context_length: int) -> str:
    """What a client calling the model with the SDK's defaults gets, for a model of ``context_length`` tokens."""
    if context_length <= SDK_DEFAULT_OUTPUT_TOKENS:
        return (f"{context_length} tokens: a Foundry Local SDK client with default options reserves "
                f"{SDK_DEFAULT_OUTPUT_TOKENS} output tokens and is refused; pass max_output_tokens (SearchOptions) or "
                "max_tokens (OpenAI API) ≤ context − prompt (docs/reliability.md: Calling the deployed model from your "
                "code)")
    return (f"{context_length} tokens: a client with default options ({SDK_DEFAULT_OUTPUT_TOKENS} output tokens) fits "
            f"prompts up to {context_length - SDK_DEFAULT_OUTPUT_TOKENS} tokens")


def inference_model_name(model_dir: Path) -> str | None:
    """``inference_model.json`` ``Name`` (what the v1 CLI lists a folder under), or None."""
    p = Path(model_dir) / "inference_model.json"
    try:
        name = json.loads(p.read_text(encoding="utf-8")).get("Name")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None
