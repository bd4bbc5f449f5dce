"""Environment check behind ``invoke doctor``.

Pure core, I/O at the edges:

- :func:`read_pins` parses ``requirements.txt``: the single source of truth for expected versions.
- :func:`gather_facts` does all the I/O (package metadata, RAM, disk, ``cmake --version``, ``foundry`` on
  PATH, and a *subprocess* probe of the Foundry Local SDK so this process never loads its native library).
- :func:`evaluate` turns facts + pins into :class:`Check` rows. It is pure and unit-tested with hand-made
  :class:`Facts`.
- :func:`render_table` (at most two lines per check at any width from 80 columns) and :func:`render_notes` (what
  was expected and the fix, under the table); :func:`run_doctor` prints them and raises
  :class:`~scripts.core.errors.EnvironmentCheckError` if any row is ``FAIL``.

Known-bad versions (measured, see ``FIELD-NOTES.md``) are kept here as *ranges* with their explanation;
the versions we expect always come from ``requirements.txt``.
"""
from __future__ import annotations

import enum
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from rich.console import Console
from rich.table import Table

from scripts.core import settings
from scripts.core.errors import EnvironmentCheckError
from scripts.peers import llamacpp

logger = logging.getLogger(__name__)

REQUIREMENTS_PATH = settings.REPO_ROOT / "requirements.txt"

#: Packages that get a row of their own, in table order (names only: versions come from requirements.txt).
REQUIRED_PACKAGES: tuple[str, ...] = (
    "olive-ai",
    "onnxruntime",
    "onnxruntime-genai",
    "onnxruntime-genai-core",
    "transformers",
    "torch",
    "requests",
    "foundry-local-sdk",
)

#: Python minor version the pins were resolved and tested on.
TESTED_PYTHON = "3.11"
#: The tutorial asks for at least this much free RAM.
MIN_RAM_GIB = 8.0
#: Free space wanted where converted models and the Foundry cache live.
MIN_DISK_GIB = 5.0
#: CMake the tutorial needs for its from-source ONNX Runtime GenAI build (which this project does not do).
TUTORIAL_CMAKE = "3.31"
PIP_FIX = "pip install -r requirements.txt"

_GIB = 1024**3
_PROBE_MARKER = "SLMOPS-DOCTOR-PROBE "
_PROBE_TIMEOUT_S = 120


class Status(enum.Enum):
    """Verdict of one row. Only ``FAIL`` makes the doctor exit non-zero."""

    OK = "OK"
    INFO = "INFO"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    """One row of the doctor table."""

    name: str
    found: str
    expected: str
    status: Status
    fix: str = ""


@dataclass(frozen=True)
class DiskFact:
    """Free space of the filesystem holding ``path`` (``free_bytes`` is None when it could not be measured)."""

    label: str
    path: str
    free_bytes: int | None
    problem: str | None = None  # not a folder, cannot be created, not writable (see :func:`folder_problem`)


@dataclass(frozen=True)
class SdkProbe:
    """Result of importing ``foundry_local_sdk`` and loading its native library in a child process."""

    imported: bool
    sdk_version: str | None = None
    native_loaded: bool = False
    native_version: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Facts:
    """Everything the doctor measured. Built by :func:`gather_facts`, or by hand in tests."""

    python_version: str
    platform: str
    ram_available_bytes: int | None
    ram_total_bytes: int | None
    disks: tuple[DiskFact, ...]
    cmake_version: str | None
    foundry_cli_path: str | None
    #: normalised package name -> installed version, or None when not installed
    packages: Mapping[str, str | None] = field(default_factory=dict)
    sdk_probe: SdkProbe = SdkProbe(imported=False, error="not probed")


@dataclass(frozen=True)
class KnownBad:
    """A version range of ``package`` measured not to work, optionally only alongside ``context``."""

    package: str
    versions: str
    problem: str
    context: tuple[str, str] | None = None  # (other package, specifier) the problem applies with


#: Measured incompatibilities (FIELD-NOTES.md, "Versions that work together").
KNOWN_BAD: tuple[KnownBad, ...] = (
    KnownBad(
        "onnxruntime-genai",
        ">=0.15,<0.16",
        "Olive 0.13's ModelBuilder fails with this version: "
        "\"Hugging Face details not found in extra_options\"",
        context=("olive-ai", "==0.13.*"),
    ),
    KnownBad(
        "onnxruntime-genai",
        ">=0.16,<0.19",
        "Olive 0.13's ModelBuilder fails with this version: "
        "\"No module named 'onnxruntime_genai.models.quantized_model'\"",
        context=("olive-ai", "==0.13.*"),
    ),
)

#: Packages some other package imports without declaring them: (needed by, explanation).
UNDECLARED_NEEDS: Mapping[str, tuple[str, str]] = {
    "requests": ("olive-ai", "olive-ai 0.13 imports requests but does not declare it"),
}


# --------------------------------------------------------------------------------------------------
# requirements.txt
# --------------------------------------------------------------------------------------------------


def normalize_name(name: str) -> str:
    """Normalise a distribution name the way PyPI does (PEP 503): lower case, runs of ``-_.`` -> ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(requirements_path: Path | str = REQUIREMENTS_PATH) -> dict[str, str]:
    """Parse a requirements file into ``{normalised name: expected}``.

    ``expected`` is the bare version for ``==``/``===`` pins (``"0.14.1"``) and the specifier text for
    anything else (``">=2,<3"``), or ``""`` when the line has no version. Comments, blank lines, pip
    options (``-r``, ``--index-url``, ``--hash``...), extras and environment markers are handled;
    line continuations (``\\``) are joined.

    Raises:
        EnvironmentCheckError: the file is missing or a line cannot be parsed.
    """
    path = Path(requirements_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EnvironmentCheckError(
            f"cannot read the pinned requirements at {path}: {exc}. "
            "Run the doctor from a checkout of the project."
        ) from exc

    pins: dict[str, str] = {}
    for lineno, line in _logical_lines(text):
        if line.startswith("-"):  # -r other.txt, -e ., --index-url ...
            logger.debug("%s:%d: skipping pip option %r", path, lineno, line)
            continue
        line = re.split(r"\s+--?\w", line, maxsplit=1)[0].strip()  # drop per-line options (--hash=...)
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise EnvironmentCheckError(
                f"{path}:{lineno}: cannot parse requirement {line!r} ({exc}). "
                "Fix the line (expected e.g. 'name==1.2.3')."
            ) from exc
        pins[normalize_name(req.name)] = _expected_from_specifier(req.specifier)
    logger.debug("read %d pins from %s", len(pins), path)
    return pins


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """Yield ``(first line number, line)`` with comments stripped, continuations joined, blanks dropped."""
    pending = ""
    start = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if not pending:
            start = lineno
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            yield start, line
    if pending.strip():
        yield start, pending.strip()


def _expected_from_specifier(spec: SpecifierSet) -> str:
    specs = list(spec)
    if len(specs) == 1 and specs[0].operator in ("==", "===") and "*" not in specs[0].version:
        return specs[0].version
    return str(spec)


# --------------------------------------------------------------------------------------------------
# I/O: gather facts
# --------------------------------------------------------------------------------------------------


def gather_facts(
    package_names: Iterable[str] | None = None,
    *,
    requirements_path: Path | str = REQUIREMENTS_PATH,
    disk_paths: Mapping[str, Path] | None = None,
) -> Facts:
    """Measure this machine. All of the doctor's I/O happens here.

    Args:
        package_names: distributions whose installed version to look up. Default: every name in
            ``requirements_path`` plus :data:`REQUIRED_PACKAGES`.
        requirements_path: used only for the default ``package_names``.
        disk_paths: ``{label: path}`` whose filesystem free space to measure. Default: the build dir
            and the Foundry Local cache (see :mod:`scripts.core.settings`).
    """
    if package_names is None:
        try:
            names = list(read_pins(requirements_path))
        except EnvironmentCheckError as exc:
            logger.warning("%s", exc)
            names = []
        package_names = list(dict.fromkeys([*REQUIRED_PACKAGES, *names, llamacpp.PACKAGE]))
    if disk_paths is None:
        disk_paths = {
            "build dir": settings.build_dir(),
            "Foundry cache": settings.default_foundry_cache(),
        }
    ram_available, ram_total = _ram()
    return Facts(
        python_version=".".join(str(p) for p in sys.version_info[:3]),
        platform=sys.platform,
        ram_available_bytes=ram_available,
        ram_total_bytes=ram_total,
        disks=tuple(_disk(label, Path(p)) for label, p in disk_paths.items()),
        cmake_version=_cmake_version(),
        foundry_cli_path=shutil.which("foundry"),
        packages={normalize_name(n): _installed_version(n) for n in package_names},
        sdk_probe=probe_foundry_sdk(),
    )


def _installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _ram() -> tuple[int | None, int | None]:
    try:
        import psutil

        mem = psutil.virtual_memory()
        return int(mem.available), int(mem.total)
    except Exception as exc:  # psutil missing or unsupported platform: report, don't crash the doctor
        logger.warning("could not measure RAM: %s", exc)
        return None, None


def _disk(label: str, path: Path) -> DiskFact:
    """Free space of the filesystem that holds ``path`` (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError as exc:
        logger.warning("could not measure free disk at %s: %s", probe, exc)
        free = None
    return DiskFact(label=label, path=str(path), free_bytes=free, problem=folder_problem(path))


def folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot serve as a state folder (None: it is a writable folder, or can be created as one)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{path} cannot be created: {probe} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable (a read-only filesystem or its permissions)" if probe == path else \
            f"{path} cannot be created: {probe} is not writable"
    return None


def _cmake_version() -> str | None:
    exe = shutil.which("cmake")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("`cmake --version` failed: %s", exc)
        return None
    match = re.search(r"version\s+(\S+)", out)
    return match.group(1) if match else (out.strip().splitlines() or ["?"])[0]


_PROBE_CODE = f"""
import json
out = {{"imported": False, "sdk_version": None, "native_loaded": False, "native_version": None, "error": None}}
try:
    import foundry_local_sdk
    out["imported"] = True
    out["sdk_version"] = getattr(foundry_local_sdk, "__version__", None)
    # Importing the package does not load libfoundry_local; touching the private api object does.
    from foundry_local_sdk._native.api import api
    out["native_version"] = api.version_string()
    out["native_loaded"] = True
except BaseException as exc:
    out["error"] = f"{{type(exc).__name__}}: {{exc}}"
print({_PROBE_MARKER!r} + json.dumps(out), flush=True)
"""


def probe_foundry_sdk(python: str | None = None, timeout: float = _PROBE_TIMEOUT_S) -> SdkProbe:
    """Import ``foundry_local_sdk`` and load its native library in a child process.

    ``import foundry_local_sdk`` alone does not load ``libfoundry_local`` (it is loaded lazily), so the
    probe also constructs the SDK's native API object and asks the library for its version. A crash of
    the child (e.g. a segfault in the loader) is reported, not propagated.
    """
    cmd = [python or sys.executable, "-c", _PROBE_CODE]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return SdkProbe(imported=False, error=f"probe timed out after {timeout:.0f} s")
    except OSError as exc:
        return SdkProbe(imported=False, error=f"probe could not start: {exc}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_PROBE_MARKER):
            data = json.loads(line[len(_PROBE_MARKER):])
            return SdkProbe(**data)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return SdkProbe(imported=False, error=f"probe process exited with status {proc.returncode}: {tail}")


# --------------------------------------------------------------------------------------------------
# Pure core: evaluate
# --------------------------------------------------------------------------------------------------


def evaluate(
    facts: Facts,
    pins: Mapping[str, str],
    *,
    min_ram_gib: float = MIN_RAM_GIB,
    min_disk_gib: float = MIN_DISK_GIB,
    peer_pin: str | None = None,
) -> list[Check]:
    """Turn measured facts and the requirements pins into table rows. Pure: no I/O. ``peer_pin``: the
    llama-cpp-python pin of ``requirements-peer.txt`` (the optional llama.cpp peer)."""
    pins = {normalize_name(k): v for k, v in pins.items()}
    packages = {normalize_name(k): v for k, v in facts.packages.items()}
    checks = [
        _check_python(facts.python_version),
        _check_ram(facts.ram_available_bytes, facts.ram_total_bytes, min_ram_gib),
        *(_check_disk(d, min_disk_gib) for d in facts.disks),
        _check_cmake(facts.cmake_version),
    ]
    checks += [_check_package(name, packages, pins) for name in REQUIRED_PACKAGES]
    checks.append(_check_foundry_cli(facts.foundry_cli_path, facts.platform))
    checks.append(_check_sdk_runtime(facts.sdk_probe, pins))
    checks.append(_check_other_pins(packages, pins))
    checks.append(_check_peer(packages.get(normalize_name(llamacpp.PACKAGE)), peer_pin))
    return checks


def failures(checks: Iterable[Check]) -> list[Check]:
    """The rows whose verdict is ``FAIL``."""
    return [c for c in checks if c.status is Status.FAIL]


def _gib(n: int) -> str:
    return f"{n / _GIB:.1f} GiB"


def _check_python(version: str) -> Check:
    minor = ".".join(version.split(".")[:2])
    if minor == TESTED_PYTHON:
        return Check("Python", version, f"{TESTED_PYTHON}.x (tested)", Status.OK)
    return Check(
        "Python", version, f"{TESTED_PYTHON}.x (tested)", Status.WARN,
        f"untested: the pins in requirements.txt were resolved on Python {TESTED_PYTHON}; "
        f"create the venv with python{TESTED_PYTHON}",
    )


def _check_ram(available: int | None, total: int | None, min_gib: float) -> Check:
    expected = f">= {min_gib:g} GiB available"
    if available is None:
        return Check("RAM", "unknown", expected, Status.WARN, "could not measure (is psutil installed?)")
    found = f"{_gib(available)} available" + (f" of {_gib(total)}" if total else "")
    if available < min_gib * _GIB:
        return Check(
            "RAM", found, expected, Status.WARN,
            "the tutorial asks for 8 GB; int4 conversion of a 0.5B model peaked at ~4.5-6.5 GB RSS: "
            "close other programs or pick a smaller model",
        )
    return Check("RAM", found, expected, Status.OK)


def _check_disk(disk: DiskFact, min_gib: float) -> Check:
    name = f"Disk free ({disk.label})"
    expected = f">= {min_gib:g} GiB"
    if disk.problem:
        variable = "SLMOPS_FOUNDRY_CACHE" if "cache" in disk.label.lower() else "SLMOPS_BUILD_DIR"
        extra = " (`check` and `run` still read a read-only cache)" if "not writable" in disk.problem and \
            variable == "SLMOPS_FOUNDRY_CACHE" else ""
        return Check(f"{disk.label} folder", disk.problem, "a writable folder", Status.FAIL,
                     f"make it a writable folder, or point {variable} at one{extra}")
    if disk.free_bytes is None:
        return Check(name, f"unknown ({disk.path})", expected, Status.WARN, "could not measure free space")
    found = f"{_gib(disk.free_bytes)} at {disk.path}"
    if disk.free_bytes < min_gib * _GIB:
        return Check(
            name, found, expected, Status.WARN,
            "free space, or point SLMOPS_BUILD_DIR / SLMOPS_FOUNDRY_CACHE at a larger disk",
        )
    return Check(name, found, expected, Status.OK)


def _check_cmake(version: str | None) -> Check:
    expected = f">= {TUTORIAL_CMAKE} (optional)"
    why = (
        f"only the tutorial's from-source build of ONNX Runtime GenAI needs CMake {TUTORIAL_CMAKE}+; "
        "this project uses the wheel: nothing to do (if you build it: pip install cmake gives 4.x)"
    )
    if version is None:
        return Check("CMake", "not found", expected, Status.WARN, why)
    try:
        ok = Version(version) >= Version(TUTORIAL_CMAKE)
    except InvalidVersion:
        return Check("CMake", version, expected, Status.WARN, f"unrecognised version; {why}")
    return Check("CMake", version, expected, Status.OK if ok else Status.WARN, "" if ok else why)


def _version_matches(found: str, expected: str) -> bool:
    """True if ``found`` satisfies ``expected`` (a bare pin, compared without local label, or a specifier)."""
    if not expected:
        return True
    try:
        v = Version(found)
    except InvalidVersion:
        return found == expected
    try:
        return v.public == Version(expected).public
    except InvalidVersion:
        pass
    try:
        return SpecifierSet(expected).contains(v, prereleases=True)
    except InvalidSpecifier:
        return found == expected


def _in_range(version: str | None, spec: str) -> bool:
    if not version:
        return False
    try:
        return SpecifierSet(spec).contains(Version(Version(version).public), prereleases=True)
    except (InvalidVersion, InvalidSpecifier):
        return False


def _known_bad(name: str, version: str, packages: Mapping[str, str | None],
               pins: Mapping[str, str]) -> KnownBad | None:
    for rule in KNOWN_BAD:
        if normalize_name(rule.package) != name or not _in_range(version, rule.versions):
            continue
        if rule.context is not None:
            other, other_spec = rule.context
            other = normalize_name(other)
            other_version = packages.get(other) or pins.get(other)
            if not _in_range(other_version, other_spec):
                continue
        return rule
    return None


def _pin_fix(name: str, expected: str) -> str:
    if expected and not any(ch in expected for ch in "<>=!~,"):
        return f"{PIP_FIX}  (or: pip install {name}=={expected})"
    return PIP_FIX


def _check_package(name: str, packages: Mapping[str, str | None], pins: Mapping[str, str]) -> Check:
    key = normalize_name(name)
    found = packages.get(key)
    expected = pins.get(key)
    expected_text = expected if expected else ("any" if expected == "" else "not pinned")

    if found is None:
        fix = _pin_fix(name, expected or "")
        if key in UNDECLARED_NEEDS:
            needed_by, why = UNDECLARED_NEEDS[key]
            if packages.get(normalize_name(needed_by)):
                fix = f"{why}: {fix}"
        return Check(name, "not installed", expected_text, Status.FAIL, fix)

    rule = _known_bad(key, found, packages, pins)
    if rule is not None:
        if expected and not _in_range(expected, rule.versions):
            fix = f"{name} {found} is known bad ({rule.problem}): pin {expected}: {_pin_fix(name, expected)}"
        else:
            fix = (f"{name} {found} is known bad ({rule.problem}); requirements.txt pins a version in the "
                   f"bad range {rule.versions}: change the pin (see FIELD-NOTES.md)")
        return Check(name, found, expected_text, Status.FAIL, fix)

    if expected is None:
        return Check(name, found, expected_text, Status.WARN,
                     f"{name} is not pinned in requirements.txt: add the tested version there")
    if not _version_matches(found, expected):
        return Check(name, found, expected_text, Status.WARN,
                     f"differs from the tested pin: {_pin_fix(name, expected)}")
    return Check(name, found, expected_text, Status.OK)


def _check_foundry_cli(path: str | None, platform: str) -> Check:
    expected = "optional (v1 CLI exists for Windows/macOS)"
    if path:
        return Check("foundry CLI", path, expected, Status.OK)
    note = "none needed: the SDK runtime (foundry-local-sdk) is used"
    if not platform.startswith("linux"):
        note += "; install the Foundry Local CLI to use `foundry cache`/`foundry model run`"
    return Check("foundry CLI", "not on PATH; the SDK runtime is used", expected, Status.INFO, note)


def _check_sdk_runtime(probe: SdkProbe, pins: Mapping[str, str]) -> Check:
    name = "Foundry Local runtime (SDK)"
    pin = pins.get("foundry-local-sdk")
    expected = f"SDK {pin} + native library loads" if pin else "SDK imports + native library loads"
    if not probe.imported:
        return Check(name, f"import failed: {probe.error or 'unknown error'}", expected, Status.FAIL,
                     _pin_fix("foundry-local-sdk", pins.get("foundry-local-sdk", "")))
    if not probe.native_loaded:
        deps = ", ".join(f"{p}=={pins[p]}" for p in ("onnxruntime", "onnxruntime-genai-core") if pins.get(p))
        return Check(
            name, f"SDK {probe.sdk_version}; native library failed: {probe.error}", expected, Status.FAIL,
            "the wheel bundles libfoundry_local and loads ONNX Runtime / GenAI from their own packages"
            + (f" ({deps})" if deps else "") + ": pip install --force-reinstall -r requirements.txt",
        )
    native = probe.native_version or "?"
    return Check(name, f"SDK {probe.sdk_version}, native library {native} loaded", expected, Status.OK)


def _check_other_pins(packages: Mapping[str, str | None], pins: Mapping[str, str]) -> Check:
    required = {normalize_name(n) for n in REQUIRED_PACKAGES}
    others = sorted(k for k in pins if k not in required)
    name = "other pinned packages"
    expected = f"{len(others)} as in requirements.txt"
    missing = [k for k in others if packages.get(k) is None]
    differ = [f"{k} {packages[k]} (pin {pins[k]})" for k in others
              if packages.get(k) is not None and not _version_matches(packages[k], pins[k])]
    if missing:
        return Check(name, "missing: " + ", ".join(missing), expected, Status.FAIL, PIP_FIX)
    if differ:
        return Check(name, "differ: " + ", ".join(differ), expected, Status.WARN, PIP_FIX)
    return Check(name, f"all {len(others)} match", expected, Status.OK)


def _check_peer(installed: str | None, pin: str | None) -> Check:
    """The optional llama.cpp peer (``invoke bench --peer llama.cpp``): never a failure."""
    st = llamacpp.peer_status(installed, pin)
    status = Status.OK if st.matches_pin else (Status.WARN if st.installed else Status.INFO)
    return Check(f"{llamacpp.NAME} peer ({llamacpp.PACKAGE})", st.found, st.expected, status, st.fix)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

_STYLE = {Status.OK: "green", Status.INFO: "cyan", Status.WARN: "yellow", Status.FAIL: "bold red"}
#: Widest the Check column gets; longer names wrap to a second line.
_NAME_WIDTH = 27
#: Table cells per row at most: a longer Found moves to the notes under the table.
_MAX_LINES = 2
_SEE_BELOW = "(see below)"


def _found_width(checks: list[Check], width: int) -> tuple[int, int]:
    """(Check column width, Found column width) of the table at ``width`` columns: 4 borders and 3 × 2 padding,
    the Verdict column as wide as its header."""
    name_width = min(_NAME_WIDTH, max(len(c.name) for c in checks))
    return name_width, max(12, width - 10 - name_width - len("Verdict"))


def _fits(text: str, width: int) -> bool:
    import textwrap

    return len(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)) <= _MAX_LINES and all(
        len(word) <= width for word in text.split())


def render_table(checks: Iterable[Check], width: int = 80) -> Table:
    """The checks at ``width`` columns, at most two lines each: name, verdict and what was found. What was expected
    and how to fix it are in :func:`render_notes` (under the table), as is a Found too long for two lines."""
    checks = list(checks)
    name_width, found_width = _found_width(checks, width)
    table = Table(title="SLMOps Deploy: environment check", show_lines=False)
    table.add_column("Check", width=name_width, overflow="fold")
    table.add_column("Verdict", no_wrap=True)
    table.add_column("Found", width=found_width, overflow="fold")
    for c in checks:
        found = c.found if _fits(c.found, found_width) else _SEE_BELOW
        table.add_row(c.name, f"[{_STYLE[c.status]}]{c.status.value}[/]", found)
    return table


def render_notes(checks: Iterable[Check], width: int = 80) -> list[tuple[str, str]]:
    """``(heading, text)`` per check that is not OK or whose Found did not fit the table: what was found (when the
    table could not show it), what was expected and the fix."""
    checks = list(checks)
    _, found_width = _found_width(checks, width)
    notes = []
    for c in checks:
        long_found = not _fits(c.found, found_width)
        if c.status is Status.OK and not long_found:
            continue
        parts = [f"Found {c.found}." if long_found else "", f"Expected {c.expected}." if c.expected else "",
                 f"Fix: {c.fix}." if c.fix else ""]
        notes.append((f"{c.name}: {c.status.value}", " ".join(p for p in parts if p)))
    return notes


def print_report(console: Console, checks: list[Check]) -> None:
    """The table, then the notes (a heading line, the text indented under it), readable at 80 columns and in a log."""
    import textwrap

    from rich.text import Text

    console.print(render_table(checks, console.width))
    for heading, text in render_notes(checks, console.width):
        console.print(Text(heading, style="bold"))
        for line in textwrap.wrap(text, max(20, console.width - 2), break_on_hyphens=False):
            console.print(Text("  " + line), soft_wrap=True)  # wrapped here: no padding to the console width


def run_doctor(console: Console | None = None, *, requirements_path: Path | str = REQUIREMENTS_PATH
               ) -> list[Check]:
    """Check this machine, print the table, and return the rows.

    Raises:
        EnvironmentCheckError: some row is ``FAIL`` (the message lists each with its fix; the rows are
            also attached as ``.checks``), or ``requirements.txt`` cannot be read.
    """
    console = console or Console()
    pins = read_pins(requirements_path)
    facts = gather_facts(requirements_path=requirements_path)
    checks = evaluate(facts, pins, peer_pin=llamacpp.pinned_version())
    print_report(console, checks)
    for c in checks:
        logger.debug("doctor: %s | %s | %s | %s", c.name, c.found, c.status.value, c.fix)
    failed = failures(checks)
    if failed:
        lines = "\n".join(f"- {c.name}: found {c.found}, expected {c.expected}. Fix: {c.fix}" for c in failed)
        err = EnvironmentCheckError(f"{len(failed)} environment check(s) failed:\n{lines}")
        err.checks = checks  # type: ignore[attr-defined]
        raise err
    return checks


if __name__ == "__main__":  # python -m scripts.doctor
    logging.basicConfig(level=logging.WARNING)
    try:
        run_doctor()
    except EnvironmentCheckError as exc:
        print(exc, file=sys.stderr)
        sys.exit(exc.exit_code)
