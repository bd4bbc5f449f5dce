"""Make-style steps: a step runs only when the content hash of its inputs (files and settings) changed
since its last successful run, or when its outputs are gone, or when forced."""
from __future__ import annotations

import ast
import importlib.util
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from scripts.core.errors import StepError
from scripts.core.faults import checkpoint
from scripts.core.fileops import hash_file, hash_json, hash_path, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One unit of work. ``inputs`` are files/folders hashed by content; ``settings`` is plain data;
    ``code`` names the project modules that do the work (``"scripts.convert.olive"``): they and every project
    module they import, transitively (:func:`module_closure`), are hashed, so an edit to any of them reruns the
    step."""

    name: str
    run: Callable[[], Any]
    inputs: list[Path] = field(default_factory=list)
    settings: Any = None
    outputs: list[Path] = field(default_factory=list)
    code: list[str] = field(default_factory=list)
    #: When the stamp says "unchanged": what is wrong with the outputs anyway (None: nothing), e.g. the installed
    #: model no longer being the package (scripts.convert.versions.verify). A reason reruns the step and is said.
    verify: Callable[[], str | None] | None = None


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
            "code": code_fingerprint(step.code),
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
        stale = None
        if self.is_fresh(step, fingerprint):
            stale = step.verify() if step.verify else None
            if stale is None:
                self.announce(f"• {step.name}: skipped (inputs unchanged)")
                return StepOutcome(step.name, True, time.perf_counter() - start, self.recorded_result(step))
        self.announce(f"▶ {step.name}" + (f" (inputs unchanged, but {stale})" if stale else ""))
        # No stamp while the step runs: a run killed after replacing its outputs must not leave the old stamp vouching
        # for them (outputs are checked for existence, not content). A step that raises has left its outputs as they
        # were (atomic_dir), so its old stamp comes back.
        stamp = self._stamp(step)
        previous = stamp.read_text(encoding="utf-8") if stamp.is_file() else None
        stamp.unlink(missing_ok=True)
        checkpoint(f"step:{step.name}:start")
        try:
            result = step.run()
        except BaseException:
            if previous is not None:
                write_text_atomic(stamp, previous)
            raise
        checkpoint(f"step:{step.name}:ran")
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


# ----- code fingerprints ------------------------------------------------------------------------------------------
_MODULE_STRING = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+(:[A-Za-z_][A-Za-z0-9_]*)?$")


def _module_file(name: str) -> Path:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        raise StepError(f"Step code names the module {name!r}, which cannot be found ({exc}). Name an existing "
                        "module of the project (after moving a module, update the step).") from None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise StepError(f"Step code names the module {name!r}, which does not exist. Name an existing module of "
                        "the project (after moving a module, update the step).")
    return Path(spec.origin)


def _is_module(name: str) -> bool:
    """Whether ``name`` is a module, without running it: only a package's submodules are looked up (finding
    ``a.b.c`` would import the module ``a.b`` to ask it)."""
    parent = name.rpartition(".")[0]
    try:
        parent_spec = importlib.util.find_spec(parent) if parent else None
        if parent and (parent_spec is None or parent_spec.submodule_search_locations is None):
            return False
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def project_imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that a source file imports (at any depth, also inside functions), plus module strings
    such as ``"scripts.runtimes.genai_smoke:generate"`` handed to a worker process."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == package}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == package:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _is_module(sub) else node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_STRING.match(node.value) \
                and node.value.split(".")[0] == package:
            found.add(node.value.split(":")[0])
    return {name for name in found if name != package}


def module_closure(roots: Iterable[str]) -> dict[str, Path]:
    """Every module that ``roots`` use: the roots and, transitively, the modules of their own top-level package
    (``scripts`` for the project) that they import. A name that does not resolve to a file is a :class:`StepError`
    (never a silent constant), so a moved module cannot drop out of a fingerprint unnoticed."""
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen[name] = _module_file(name)
        todo.extend(project_imports(seen[name], name.split(".")[0]) - set(seen))
    return seen


def code_fingerprint(roots: Iterable[str]) -> dict[str, str]:
    """Content hash of every module in :func:`module_closure` of ``roots``, by module name."""
    return {name: hash_file(path) for name, path in sorted(module_closure(roots).items())}
