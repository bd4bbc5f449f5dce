"""llama.cpp's Hugging Face → GGUF converter, taken from the llama-cpp-python sdist (the pinned version's own
``vendor/llama.cpp/convert_hf_to_gguf.py`` and its ``conversion/`` package), downloaded once with pip into
``<build>/downloads/`` and extracted beside it; later runs use the extracted copy.

The converter runs with the ``gguf-py`` copy from the same sdist (``gguf-py/gguf/`` beside the script, where it
looks first), not the pinned ``gguf`` package: both say 0.19.0, but llama-cpp-python 0.3.36's converter uses
constants the released gguf 0.19.0 lacks (``MODEL_ARCH.DFLASH``: ``AttributeError`` while importing its Qwen
classes). The pinned package stays what the project itself reads GGUF files with.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath
from typing import Callable

from scripts.core import settings
from scripts.core.errors import PeerError
from scripts.core.fileops import atomic_dir
from scripts.peers.llamacpp import PACKAGE
from scripts.core.workers import tail

log = logging.getLogger(__name__)

CONVERTER = "convert_hf_to_gguf.py"
VENDOR = ("vendor", "llama.cpp")
#: What the converter needs from the sdist: the script, the package it imports its model classes from, and the
#: gguf-py it was written against.
MEMBERS = (CONVERTER, "conversion/", "gguf-py/gguf/")


def downloads_dir() -> Path:
    return settings.build_dir() / "downloads"


def sdist_name(version: str) -> str:
    return f"llama_cpp_python-{version}.tar.gz"


def converter_dir(version: str, downloads: Path | None = None) -> Path:
    return (downloads or downloads_dir()) / f"llama.cpp-converter-{version}"


def complete(folder: Path) -> bool:
    """The converter folder holds the script, its ``conversion`` package and its ``gguf-py``."""
    return all((folder / p).is_file() for p in (CONVERTER, "conversion/__init__.py", "gguf-py/gguf/__init__.py"))


def wanted(member: str) -> str | None:
    """The path under the converter folder for an sdist member we keep (``None``: not needed). Pure."""
    parts = PurePosixPath(member).parts
    if len(parts) < 4 or parts[1:3] != VENDOR or ".." in parts:
        return None
    rest = "/".join(parts[3:])
    keep = any(rest == m or (m.endswith("/") and rest.startswith(m) and rest.endswith(".py")) for m in MEMBERS)
    return rest if keep else None


def extract_converter(sdist: Path, target: Path) -> Path:
    """Extract the converter files of ``sdist`` into ``target`` (atomically: a half extraction is never seen)."""
    try:
        with tarfile.open(sdist, "r:gz") as tar, atomic_dir(target) as staging:
            found = 0
            for member in tar.getmembers():
                rel = wanted(member.name)
                if rel is None or not member.isfile():
                    continue
                out = staging / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(member).read())
                found += 1
            if not complete(staging):
                raise PeerError(f"{sdist} has no vendor/llama.cpp/{CONVERTER} with its conversion/ and gguf-py/ "
                                f"({found} files matched); this llama-cpp-python version ships the converter "
                                "differently: pin the tested version in requirements-peer.txt.")
    except (tarfile.TarError, OSError) as exc:
        raise PeerError(f"Could not read the llama-cpp-python sdist {sdist}: {exc}. Delete it and run again to "
                        "download it anew.") from exc
    return target


def download_sdist(version: str, downloads: Path, run: Callable = subprocess.run) -> Path:
    """``pip download`` the sdist of llama-cpp-python ``version`` into ``downloads`` (pip's cache is used)."""
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"{PACKAGE}=={version}",
           "-d", str(downloads)]
    log.info("Downloading %s %s sdist for llama.cpp's converter", PACKAGE, version)
    proc = run(cmd, capture_output=True, text=True, timeout=1800)
    sdist = downloads / sdist_name(version)
    if proc.returncode != 0 or not sdist.is_file():
        raise PeerError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); llama.cpp's converter comes from that "
                        f"sdist. Check the package index is reachable.\n{tail(proc.stderr)}")
    return sdist


def ensure_converter(version: str, downloads: Path | None = None, run: Callable = subprocess.run) -> Path:
    """The folder holding ``convert_hf_to_gguf.py`` of llama-cpp-python ``version``: extracted before, else
    extracted from the sdist in ``downloads`` (downloaded first when absent)."""
    downloads = downloads or downloads_dir()
    target = converter_dir(version, downloads)
    if complete(target):
        return target
    sdist = downloads / sdist_name(version)
    if not sdist.is_file():
        sdist = download_sdist(version, downloads, run)
    return extract_converter(sdist, target)
