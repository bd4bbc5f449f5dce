"""One child-process protocol for every worker: ``python -m scripts.core.workers MODULE:FUNCTION``.

Heavy or native work (the Foundry Local runtime, ONNX Runtime GenAI, torch training, the LoRA merge) runs in a
child process so that its memory and native libraries never share the pipeline's process. Every such call goes
through :func:`run_in_worker`:

- request in: one JSON object, handed to ``FUNCTION(request)`` (a file, ``--input``, or stdin);
- result out: ``{"ok": true, "result": …}`` or ``{"ok": false, "error_type": "FoundryError", "error": "…"}``
  (a file, ``--output``, or the real stdout: anything native code prints is sent to stderr);
- exit code 0 on success, 2 on a reported failure;
- the parent raises every failure (a reported error, a crash, a timeout, a missing result) as the caller's error
  type, with the child's message and the tail of its log (``child_error_type`` keeps the child's error class name);
- on Linux a worker dies with its parent (:func:`die_with_parent`): a killed command leaves no worker writing into a
  folder that the next command recovers.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from scripts.core import settings
from scripts.core.errors import SlmopsError
from scripts.core.fileops import write_text_atomic

log = logging.getLogger(__name__)
EXIT_REPORTED = 2


def tail(text: str | bytes | None, lines: int = 25) -> str:
    """The last ``lines`` lines of a child's log."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").strip().splitlines()[-lines:])


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment with the repository importable and tokenizer threads quiet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(settings.REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                      else []))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env


_PR_SET_PDEATHSIG = 1


def _die_with_parent(prctl: Callable[..., int], parent: int) -> None:
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # runs in the forked child: no imports, no allocation-heavy work
    if os.getppid() != parent:  # the parent died before prctl
        os.kill(os.getpid(), signal.SIGKILL)


@functools.lru_cache(maxsize=1)
def _prctl() -> Callable[..., int]:
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for :mod:`subprocess` that has the kernel SIGKILL the child when this process dies (Linux
    ``PR_SET_PDEATHSIG``; None elsewhere). Start the child from the thread that waits for it: the signal follows the
    thread that forked."""
    return functools.partial(_die_with_parent, _prctl(), os.getpid()) if sys.platform == "linux" else None


def worker_command(target: str, input_file: Path | None = None, output_file: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "scripts.core.workers", target]
    if input_file:
        cmd += ["--input", str(input_file)]
    if output_file:
        cmd += ["--output", str(output_file)]
    return cmd


def run_in_worker(target: str, request: dict[str, Any], *, error: type[SlmopsError], what: str,
                  timeout: float = 3600, hint: str = "", env: dict[str, str] | None = None,
                  crash_hint: str = "") -> Any:
    """Call ``target`` (``"scripts.x.y:function"``) with ``request`` in a fresh Python process and return its result.

    ``what`` names the work for messages ("checking tiny:1 in Foundry Local"); ``hint`` is appended to a timeout
    message (what to do about it), ``crash_hint`` to a worker that died without a result. Any failure (reported, crash, timeout, no result) is raised as ``error``, with
    the child's cause and the tail of its stderr."""
    with tempfile.TemporaryDirectory(prefix="slmops-worker-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request, ensure_ascii=False), encoding="utf-8")
        log.info("Worker %s: %s", target, what)
        try:
            proc = subprocess.run(worker_command(target, req, res), cwd=str(settings.REPO_ROOT), env=worker_env(env),
                                  capture_output=True, text=True, timeout=timeout, preexec_fn=die_with_parent())
        except subprocess.TimeoutExpired as exc:
            raise error(f"{what[0].upper()}{what[1:]} did not finish within {timeout:.0f} s"
                        f"{'; ' + hint if hint else ''}.\n{tail(exc.stderr)}") from None
        payload = None
        if res.is_file():
            try:
                payload = json.loads(res.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                payload = None
    if payload is not None and payload.get("ok"):
        return payload["result"]
    log_tail = tail(proc.stderr)
    if payload is not None:
        exc = error(f"{what[0].upper()}{what[1:]} failed: {payload.get('error') or 'no cause given'}"
                    + (f"\nWorker stderr (tail):\n{log_tail}" if log_tail else ""))
        exc.child_error_type = payload.get("error_type")
        raise exc
    raise error(f"{what[0].upper()}{what[1:]} failed: the worker exited with code {proc.returncode} without a "
                f"result{'; ' + crash_hint if crash_hint else ''}. Worker stderr (tail):\n{log_tail or '(empty)'}")


# ----- child side -------------------------------------------------------------------------------------------------
def _reserve_stdout():
    """Point fd 1 at stderr (native code prints there) and return a writer on the real stdout."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(real, "w", encoding="utf-8")


def resolve(target: str) -> Callable[[dict], Any]:
    module, _, function = target.partition(":")
    if not module.startswith("scripts.") or not function:
        raise ValueError(f"worker target must be 'scripts.<module>:<function>', got {target!r}")
    return getattr(importlib.import_module(module), function)


def serve_one(target: str, raw_request: str) -> tuple[dict, int]:
    """Run one request in this process; return the payload and the exit code."""
    try:
        request = json.loads(raw_request)
        if not isinstance(request, dict):
            raise ValueError("the request must be a JSON object")
        func = resolve(target)
    except (ValueError, ImportError, AttributeError) as exc:
        return {"ok": False, "error_type": "SlmopsError", "error": f"Unreadable worker request: {exc}"}, EXIT_REPORTED
    try:
        return {"ok": True, "result": func(request)}, 0
    except SlmopsError as exc:
        log.debug("Worker %s failed", target, exc_info=True)
        return {"ok": False, "error_type": type(exc).__name__, "error": str(exc)}, EXIT_REPORTED
    except Exception as exc:  # unexpected: the traceback for the log, the cause for the caller
        traceback.print_exc(file=sys.stderr)
        return {"ok": False, "error_type": type(exc).__name__,
                "error": f"{target} crashed: {type(exc).__name__}: {exc}"}, EXIT_REPORTED


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.core.workers", description=__doc__.split("\n")[0])
    parser.add_argument("target", help="scripts.<module>:<function> taking the request dict")
    parser.add_argument("--input", help="request JSON file (default: stdin)")
    parser.add_argument("--output", help="result JSON file (default: stdout)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("SLMOPS_WORKER_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = None if args.output else _reserve_stdout()
    try:
        raw = Path(args.input).read_text(encoding="utf-8") if args.input else sys.stdin.read()
    except OSError as exc:
        raw = json.dumps(f"unreadable: {exc}")
    payload, code = serve_one(args.target, raw)
    text = json.dumps(payload, ensure_ascii=False)
    if args.output:
        write_text_atomic(Path(args.output), text)
    else:
        out.write(text + "\n")
        out.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
