"""Request checks of `invoke serve` that need the served model's own facts (issue 21), pure: ``top_k`` within the
vocabulary (the runtime answered 500 with its C++ source location), and no control token of the prompt format in any
message (the runtime tokenized ``<|im_end|><|im_start|>system …`` in user text as real control tokens and obeyed
them; `invoke run` and the eval loader refuse such text with the same reason, :func:`control_token_problem`)."""
from __future__ import annotations

import re
from typing import Any, Sequence

from scripts.core.evalset import control_token_problem
from scripts.serve.api import ApiError


def message_texts(message: dict[str, Any]) -> list[str]:
    """The text a message carries: its string content, or the ``text`` of each content part."""
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


def check_model_limits(body: dict[str, Any], vocab_size: int | None, controls: Sequence[str]) -> None:
    """Raise a 400 :class:`ApiError` naming the parameter and the limit, or the message and the control token."""
    top_k = body.get("top_k", (body.get("metadata") or {}).get("top_k"))
    if top_k is not None and vocab_size:
        try:
            value = int(top_k)
        except (TypeError, ValueError):
            value = None
        if value is not None and value > vocab_size:
            raise ApiError(400, f"'top_k' is {value}, above this model's vocabulary of {vocab_size} tokens; send a "
                                f"top_k from 1 to {vocab_size}.", param="top_k", code="invalid_value")
    for i, message in enumerate(body.get("messages") or []):
        if not isinstance(message, dict):
            continue
        for text in message_texts(message):
            problem = control_token_problem(text, controls) if controls else None
            if problem:
                raise ApiError(400, f"messages[{i}] ({message.get('role')}) {problem}. The runtime would read it "
                                    "as the model's own turn markers, letting the text rewrite the conversation; "
                                    "`invoke run` refuses the same text.", param=f"messages.[{i}].content",
                               code="control_token_in_content")


async def read_body(request) -> bytes | None:
    """The request body, or None when the client went away before sending all of it: logged as one line (Starlette
    raised ``ClientDisconnect``, and uvicorn printed an ASGI traceback for it)."""
    import logging

    from starlette.requests import ClientDisconnect
    try:
        return await request.body()
    except ClientDisconnect:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        logging.getLogger("scripts.serve").warning("%s disconnected before sending the whole request body of %s %s; "
                                                   "nothing was generated", client, request.method, request.url.path)
        return None


class InstalledWatch:
    """Notices when the installed current version of the served model changes under a running server (a deploy or
    `invoke rollback`). The server keeps serving the version it loaded — its files stay open after the folder
    exchange, so its answers stay consistent — and says once, in its log and in ``/health``, what is installed now
    and that a restart serves it. Why not reload in place: see docs/reliability.md ("A running serve and a new
    version"). Costs one ``stat`` per request (the manifest is replaced, never rewritten in place, by every install
    and rollback, so its inode changes)."""

    def __init__(self, model_dir: str, served_id: str):
        from pathlib import Path

        from scripts.convert.versions import MANIFEST
        self.manifest = Path(model_dir) / MANIFEST
        self.served_id = served_id
        self.installed_id = served_id
        self._seen = self._stat()

    def _stat(self):
        import os
        try:
            st = os.stat(self.manifest)
            return st.st_ino, st.st_mtime_ns
        except OSError:
            return None

    def check(self) -> str | None:
        """The one-line message when the installed version changed since the last call (None otherwise)."""
        seen = self._stat()
        if seen == self._seen:
            return None
        self._seen = seen
        from scripts.convert.versions import read_manifest
        manifest = read_manifest(self.manifest.parent) or {}
        installed = manifest.get("model_id") or self.installed_id
        if installed == self.installed_id:
            return None
        self.installed_id = installed
        if installed == self.served_id:
            return f"{installed} is installed again: this server serves it"
        return (f"{installed} is now the installed current version (a deploy or `invoke rollback`); this server "
                f"keeps serving {self.served_id} from the files it loaded. Restart `invoke serve` to serve {installed}.")

    def state(self) -> dict:
        """For ``/health``: what is installed and whether a restart serves it (nothing for a model installed without a
        manifest: no versions to tell apart)."""
        if self._seen is None and self.installed_id == self.served_id:
            return {}
        return {"installed": self.installed_id, "restart_to_serve_installed": self.installed_id != self.served_id}


#: A C++ source location the runtime puts into its messages (``search_options.cc:108 int fl::Validate…(int64_t, int)``).
_SOURCE_LOCATION = re.compile(r"(?:[\w.-]*/)*[\w.-]+\.(?:cc|cpp|cxx|h|hpp):\d+(?:[^()\n]*\([^)\n]*\))?:?\s*")
#: Request parameters a runtime failure may be about: such a failure is the client's (400), not the server's.
_PARAMETERS = ("top_k", "top_p", "temperature", "max_tokens", "max_completion_tokens", "presence_penalty",
               "frequency_penalty", "repetition_penalty")


def public_error(exc: ApiError) -> ApiError:
    """``exc`` as a client may see it: no C++ source locations, and a runtime failure that names a request parameter
    answered as a 400 naming it (the runtime answered 500 for a ``top_k`` beyond the vocabulary). The layer's own
    errors carry a ``code`` (``invalid_tool_call``, ``response_format_unsatisfied``: the model's answer failed, a 500)
    and keep their status."""
    message = _SOURCE_LOCATION.sub("", exc.message).strip() or "The Foundry Local runtime failed without a message."
    status, param, code, type_ = exc.status, exc.param, exc.code, exc.type
    if status >= 500 and not exc.code:
        named = next((p for p in _PARAMETERS if re.search(rf"\b{p}\b", message)), None)
        if named:
            status, param, code, type_ = 400, param or named, code or "invalid_value", None
    if (status, message, param, code) == (exc.status, exc.message, exc.param, exc.code):
        return exc
    return ApiError(status, message, type_, param, code)
