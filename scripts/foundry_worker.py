"""Worker process for Foundry Local checks: ``python -m scripts.foundry_worker [--input F] [--output F]``.

Runs the Foundry Local runtime in its own process, so that the pipeline process (which imports
``onnxruntime_genai`` for Olive) never loads the runtime's GenAI library beside it.

Input (a JSON file, or stdin)::

    {"cache_dir": "...", "model_dir": "...", "model_id": "name:1",
     "conversations": [[{"role": "user", "content": "Hi"}]],
     "max_tokens": 64, "search": null, "logs_dir": null, "app_data_dir": null}

Output (a JSON file, or stdout)::

    {"ok": true, "result": {"model_id", "listed", "load_seconds", "answers": [{"text", "seconds",
     "first_token_seconds", "tokens"}], "registration", "timings", "logs_dir"}}
    {"ok": false, "error_type": "FoundryError", "error": "message a user can act on"}

Exit code 0 on success, 2 on a reported failure. Anything the native runtime prints goes to stderr:
stdout is reserved for the JSON answer.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Sequence

from scripts.errors import FoundryError, SlmopsError
from scripts.fileops import write_text_atomic

log = logging.getLogger("scripts.foundry_worker")


def _reserve_stdout():
    """Point fd 1 at stderr (native code prints there) and return a writer on the real stdout."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(real, "w", encoding="utf-8")


def run(request: dict) -> dict:
    from scripts import foundry_runtime as fr

    missing = [k for k in ("cache_dir", "model_dir", "model_id", "conversations") if k not in request]
    if missing:
        raise FoundryError(f"Worker request lacks {', '.join(missing)}.")
    result = fr.run_check_in_process(
        cache_dir=Path(request["cache_dir"]),
        model_dir=Path(request["model_dir"]),
        model_id=request["model_id"],
        conversations=request["conversations"],
        max_tokens=int(request.get("max_tokens", 64)),
        search=request.get("search"),
        logs_dir=Path(request["logs_dir"]) if request.get("logs_dir") else None,
        app_data_dir=Path(request["app_data_dir"]) if request.get("app_data_dir") else None,
    )
    return result.to_json()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.foundry_worker", description=__doc__.split("\n")[0])
    parser.add_argument("--input", help="request JSON file (default: stdin)")
    parser.add_argument("--output", help="result JSON file (default: stdout)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = _reserve_stdout() if not args.output else None

    def emit(payload: dict) -> None:
        text = json.dumps(payload, ensure_ascii=False)
        if args.output:
            write_text_atomic(Path(args.output), text)
        else:
            out.write(text + "\n")
            out.flush()

    try:
        raw = Path(args.input).read_text(encoding="utf-8") if args.input else sys.stdin.read()
        request = json.loads(raw)
        if not isinstance(request, dict):
            raise FoundryError("Worker request must be a JSON object.")
    except (OSError, json.JSONDecodeError) as exc:
        emit({"ok": False, "error_type": "FoundryError", "error": f"Unreadable worker request: {exc}"})
        return 2
    try:
        payload = {"ok": True, "result": run(request)}
        code = 0
    except SlmopsError as exc:
        log.debug("Check failed", exc_info=True)
        payload, code = {"ok": False, "error_type": type(exc).__name__, "error": str(exc)}, 2
    except Exception as exc:  # unexpected: keep the traceback for stderr, the cause for the caller
        traceback.print_exc(file=sys.stderr)
        payload = {"ok": False, "error_type": type(exc).__name__,
                   "error": f"Foundry Local check crashed: {type(exc).__name__}: {exc}"}
        code = 2
    emit(payload)
    try:
        from scripts.foundry_runtime import close_manager
        close_manager()
    except Exception as exc:  # the answer is already written
        log.warning("Closing Foundry Local failed: %s", exc)
    return code


if __name__ == "__main__":
    sys.exit(main())
