"""Make-style steps: a step runs only when the content hash of its inputs (files and settings) changed
since its last successful run, or when its outputs are gone, or when forced."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .fileops import hash_json, hash_path, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One unit of work. ``inputs`` are files/folders hashed by content; ``settings`` is plain data;
    ``code`` lists source files whose change should also trigger a rebuild."""

    name: str
    run: Callable[[], Any]
    inputs: list[Path] = field(default_factory=list)
    settings: Any = None
    outputs: list[Path] = field(default_factory=list)
    code: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class StepOutcome:
    name: str
    skipped: bool
    seconds: float
    result: Any = None


class StepRunner:
    """Runs steps, keeping one stamp file per step under ``stamp_dir``."""

    def __init__(self, stamp_dir: Path, force: bool = False, announce: Callable[[str], None] = log.info):
        self.stamp_dir = stamp_dir
        self.force = force
        self.announce = announce

    def fingerprint(self, step: Step) -> str:
        return hash_json({
            "inputs": {str(p): hash_path(p) for p in step.inputs},
            "settings": step.settings,
            "code": {Path(p).name: hash_path(p) for p in step.code},
        })

    def _stamp(self, step: Step) -> Path:
        return self.stamp_dir / f"{step.name}.json"

    def is_fresh(self, step: Step, fingerprint: str) -> bool:
        stamp = self._stamp(step)
        if self.force or not stamp.is_file():
            return False
        try:
            recorded = json.loads(stamp.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return False
        return recorded.get("fingerprint") == fingerprint and all(p.exists() for p in step.outputs)

    def recorded_result(self, step: Step) -> Any:
        """The JSON result the step returned the last time it ran (for a skipped step's summary)."""
        stamp = self._stamp(step)
        return json.loads(stamp.read_text(encoding="utf-8")).get("result") if stamp.is_file() else None

    def run(self, step: Step) -> StepOutcome:
        start = time.perf_counter()
        fingerprint = self.fingerprint(step)
        if self.is_fresh(step, fingerprint):
            self.announce(f"• {step.name}: skipped (inputs unchanged)")
            return StepOutcome(step.name, True, time.perf_counter() - start, self.recorded_result(step))
        self.announce(f"▶ {step.name}")
        result = step.run()
        write_json_atomic(self._stamp(step), {"fingerprint": fingerprint, "finished": time.time(),
                                              "result": _jsonable(result)})
        seconds = time.perf_counter() - start
        self.announce(f"✓ {step.name} ({seconds:.1f} s)")
        return StepOutcome(step.name, False, seconds, result)

    def invalidate(self, name: str) -> None:
        self._stamp(Step(name, run=lambda: None)).unlink(missing_ok=True)


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return None
