"""Talk to the real Foundry Local runtime: register an installed model, confirm it is listed, load it, answer.

Two back ends, chosen by :func:`foundry_cli_available`:

- **SDK (Linux, and anywhere without the ``foundry`` CLI)**: ``foundry-local-sdk`` 2.x runs the runtime
  in-process (``libfoundry_local.so``). Because the pipeline process also imports ``onnxruntime_genai``
  (for Olive) and the two GenAI native libraries should not share a process, :func:`check_model` runs
  the work in a subprocess (``scripts.core.workers`` → :func:`scripts.runtimes.foundry_sdk.check_job`) and returns a typed
  :class:`CheckResult`. :class:`~scripts.runtimes.foundry_sdk.LiveChat` runs in-process, for an interactive chat in a process that
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

from pathlib import Path
from typing import Any

from scripts.core import settings
from scripts.core.errors import FoundryError, StorageError
from scripts.runtimes.foundry_api import (CheckResult, runtime_dirs, search_options_from_genai_config,
                                          validate_messages, validate_model_dir, validate_model_id)
from scripts.runtimes.foundry_cli import Runner, cli_cache_location, cli_check_model, foundry_cli_available
from scripts.core.workers import run_in_worker


def cache_root() -> Path:
    """Model cache root: ``foundry cache location`` when the CLI exists, else ``SLMOPS_FOUNDRY_CACHE``
    (default ``~/.foundry/cache/models``)."""
    if foundry_cli_available():
        return cli_cache_location()
    root = settings.default_foundry_cache()
    if root.exists() and not root.is_dir():
        raise StorageError(f"The Foundry cache {root} (SLMOPS_FOUNDRY_CACHE) is a file, not a folder. Point "
                           "SLMOPS_FOUNDRY_CACHE at a folder (it is created when missing), or unset it for the "
                           "default ~/.foundry/cache/models.")
    return root


def check_model(cache_dir: Path, model_dir: Path, model_id: str, conversations: list[list[dict]],
                max_tokens: int = 64, timeout: float = 600, *, search: dict[str, Any] | None = None,
                use_cli: bool | None = None, runner: Runner | None = None) -> CheckResult:
    """Register ``model_dir`` as ``model_id`` (idempotent), confirm it is listed, load it and answer
    each conversation (``[{"role": ..., "content": ...}, ...]``), in a worker process.

    With the v1 CLI on PATH (or ``use_cli=True``) the CLI is used instead (see :func:`cli_check_model`).
    Raises :class:`FoundryError` with the worker's cause and stderr tail on any failure.
    """
    if use_cli is None:
        use_cli = foundry_cli_available()
    if use_cli:
        return cli_check_model(model_dir, conversations, timeout=timeout, runner=runner)
    # Fail fast, with the same messages the worker would give, before paying for a process.
    validate_model_id(model_id)
    validate_model_dir(model_dir)
    search_options_from_genai_config({}, max_tokens, search)
    for conv in conversations:
        validate_messages(conv)
    request = {"cache_dir": str(Path(cache_dir).resolve()), "model_dir": str(Path(model_dir).resolve()),
               "model_id": model_id, "conversations": conversations, "max_tokens": max_tokens, "search": search}
    result = run_in_worker("scripts.runtimes.foundry_sdk:check_job", request, error=FoundryError,
                           what=f"checking {model_id} in Foundry Local", timeout=timeout,
                           hint=f"raise the timeout or look at the runtime logs in "
                                f"{runtime_dirs(Path(cache_dir))[0]}")
    return CheckResult.from_json(result)
