"""llama.cpp as a measured peer: is it installed (``llama-cpp-python``, an optional install with its own
requirements file), which version is pinned, and how to get it.

llama-cpp-python has no wheel on the package index: pip compiles it from its sdist (~12 min on 2 cores), which is
why it is not in ``requirements.txt`` and CI does not install it. Everything here is cheap (package metadata only);
``llama_cpp`` itself is imported only by the worker processes that use it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from scripts.core import settings
from scripts.core.errors import PeerUnavailableError

NAME = "llama.cpp"
PACKAGE = "llama-cpp-python"
REQUIREMENTS_FILE = "requirements-peer.txt"
#: GGML_NATIVE builds for this CPU's instruction set (AVX2, …), as a user building llama.cpp would.
INSTALL_COMMAND = f'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install -r {REQUIREMENTS_FILE}'
#: The same instruction sets without AMX. A native build on a virtual machine whose CPU reports AMX (Intel Sapphire
#: Rapids and later; llama.cpp's system info says ``AMX_INT8 = 1``) crashed with SIGSEGV at the first quantized
#: matrix product (measured 2026-12-07; llama.cpp issue #20824), F32 GGUFs running fine. Turning off every extra
#: buffer type avoided it but also drops the weight repacking llama.cpp is fast with; this build keeps that.
NO_AMX_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
                     "-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON "
                     "-DGGML_AVX512_BF16=ON")
#: What to do when a llama.cpp worker dies without a result (a native crash).
CRASH_HINT = (f"if llama.cpp crashed (exit code -11: SIGSEGV) on a CPU with AMX, its AMX kernels are the known cause: "
              f'rebuild it without them, `CMAKE_ARGS="{NO_AMX_CMAKE_ARGS}" pip install --force-reinstall --no-deps '
              f"-r {REQUIREMENTS_FILE}` (drop the AVX512 flags your CPU lacks)")


def requirements_path() -> Path:
    return settings.REPO_ROOT / REQUIREMENTS_FILE


def pinned_version(path: Path | None = None) -> str | None:
    """The ``llama-cpp-python==X`` pin of ``requirements-peer.txt`` (None when the file or the pin is missing)."""
    path = path or requirements_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(r"^\s*llama[-_.]cpp[-_.]python\s*==\s*([^\s;#]+)", text, re.MULTILINE | re.IGNORECASE)
    return match.group(1) if match else None


#: Other packages of requirements-peer.txt the peer cannot work without (llama.cpp's converter imports it).
ALSO_NEEDED = ("sentencepiece",)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def installed_version() -> str | None:
    return _version(PACKAGE)


def missing_companions() -> list[str]:
    return [name for name in ALSO_NEEDED if _version(name) is None]


def install_hint(pin: str | None = None) -> str:
    pin = pin or pinned_version() or "?"
    return (f"install it with `{INSTALL_COMMAND}` (llama-cpp-python {pin}; pip compiles llama.cpp from source, "
            "about 12 minutes on 2 cores, and needs a C/C++ compiler and CMake)")


def require_installed() -> str:
    """The installed llama-cpp-python version; :class:`PeerUnavailableError` saying how to install it if absent."""
    version = installed_version()
    if version is None:
        raise PeerUnavailableError(f"The {NAME} peer needs the optional package {PACKAGE}, which is not installed in "
                                   f"this environment: {install_hint()}. Then run the bench again; `invoke doctor` "
                                   "shows whether it is there.")
    if missing := missing_companions():
        raise PeerUnavailableError(f"The {NAME} peer also needs {', '.join(missing)} (llama.cpp's converter imports "
                                   f"it), which is not installed: `pip install -r {REQUIREMENTS_FILE}`.")
    return version


@dataclass(frozen=True)
class PeerStatus:
    """What ``invoke doctor`` shows about the peer: found, expected, whether it matches the pin, and the fix."""

    found: str
    expected: str
    installed: bool
    matches_pin: bool
    fix: str


def peer_status(installed: str | None, pin: str | None) -> PeerStatus:
    """Pure: the doctor row's content for an installed version (or None) and the pin."""
    expected = f"{pin} (optional: `invoke bench --peer {NAME}`)" if pin else "optional"
    if installed is None:
        return PeerStatus("not installed", expected, False, False,
                          f"only needed for `invoke bench --peer {NAME}`: {install_hint(pin)}")
    if pin and installed != pin:
        return PeerStatus(installed, expected, True, False,
                          f"differs from the tested pin in {REQUIREMENTS_FILE}: {INSTALL_COMMAND}")
    return PeerStatus(installed, expected, True, True, "")
