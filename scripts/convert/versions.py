"""Installed versions you can trust and take back (issue 21): an install manifest, verification, numbered versions
kept beside the cache, and rollback — all through the same crash-safe folder exchange as the install
(:func:`scripts.core.fileops.atomic_dir`).

Layout, for the model ``<publisher>/<name>``:

- ``<cache>/<publisher>/<name>/`` — the **current** version, a real folder (what the runtime registers and the cache
  scanner lists), holding :data:`MANIFEST`: the recipe that installed it, its version number, and every file's size,
  modification time and SHA-256.
- ``<cache>/.slmops-runtime/versions/<publisher>/<name>/<N>/`` — every kept version (the current one included), a
  copy of what was installed as ``name:N``, plus ``download.tmp`` so that Foundry Local's cache scanner (which
  recurses into dot-folders) skips it, and ``proof.json`` (the check's headline figures) once checked.

A package whose content equals a kept version's is that version again (a rollback followed by a redeploy restores the
newest version under its own number); any other content gets the next number. The recipe's ``foundry.keep_versions``
says how many earlier versions stay kept besides the current one.

Verification has two speeds: the fast one compares each installed file's size and modification time with the
manifest and hashes only files whose stat differs; the deep one (``check``, ``rollback``) hashes every file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from scripts.core.errors import InstallError
from scripts.core.faults import checkpoint
from scripts.core.fileops import atomic_dir, hash_file, hash_json, write_json_atomic

MANIFEST = "slmops-install.json"
PROOF = "proof.json"
SCANNER_SKIP = "download.tmp"  # as scripts.convert.install.SCANNER_SKIP (Foundry's scanner skips such folders)
INFERENCE_MODEL = "inference_model.json"
RUNTIME_DIR_NAME = ".slmops-runtime"
#: Files of a version folder that are not part of the installed model.
_BOOKKEEPING = {MANIFEST, PROOF, SCANNER_SKIP}


def versions_root(cache_root: Path, publisher: str, name: str) -> Path:
    return Path(cache_root) / RUNTIME_DIR_NAME / "versions" / publisher / name


def model_files(folder: Path) -> list[Path]:
    """The files of an installed model or a package (bookkeeping excluded), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name not in _BOOKKEEPING
                  and not p.name.startswith("."))


def content_of(folder: Path) -> dict[str, Any]:
    """``{"files": {name: {"size", "sha256"}}, "content": <hash of them all>}`` of a package or model folder."""
    files = {p.name: {"size": p.stat().st_size, "sha256": hash_file(p)} for p in model_files(folder)}
    return {"files": files, "content": hash_json({n: f["sha256"] for n, f in files.items()})}


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The install manifest of ``folder`` (None: none, or unreadable)."""
    try:
        doc = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("files"), dict) else None


def current_version(installed: Path) -> int | None:
    manifest = read_manifest(installed)
    version = (manifest or {}).get("version")
    return version if isinstance(version, int) else None


def _mb(n: int) -> str:
    return f"{n:,} bytes"


def verify(folder: Path, manifest: dict[str, Any] | None = None, deep: bool = False) -> str | None:
    """What differs between ``folder`` and its manifest (None: nothing). Fast: size and mtime per file, hashing only a
    file whose stat differs; ``deep``: hash every file."""
    folder = Path(folder)
    manifest = manifest if manifest is not None else read_manifest(folder)
    if manifest is None:
        return f"it has no install manifest ({MANIFEST}): it was installed by hand or by an older SLMOps"
    expected = manifest["files"]
    present = {p.name: p for p in model_files(folder)}
    missing = sorted(set(expected) - set(present))
    if missing:
        return f"{folder / missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    extra = sorted(set(present) - set(expected))
    if extra:
        return f"{folder / extra[0]} was not installed by SLMOps (an extra file)"
    for name, want in sorted(expected.items()):
        st = present[name].stat()
        if st.st_size != want["size"]:
            return (f"{folder / name} is {_mb(st.st_size)}; the install wrote {_mb(want['size'])} (the file was "
                    "cut or replaced)")
        if deep or st.st_mtime_ns != want.get("mtime_ns"):
            if hash_file(present[name]) != want["sha256"]:
                return f"{folder / name} does not hold what was installed (its SHA-256 differs)"
    return None


# ----- the versions kept ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Version:
    number: int
    folder: Path
    manifest: dict[str, Any]
    current: bool

    @property
    def proof(self) -> dict[str, Any]:
        try:
            return json.loads((self.folder / PROOF).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}


def kept_versions(cache_root: Path, publisher: str, name: str, installed: Path) -> list[Version]:
    """Every kept version of ``publisher/name``, oldest first; ``current`` marks the one installed."""
    root = versions_root(cache_root, publisher, name)
    current = read_manifest(installed)
    found = []
    if root.is_dir():
        for folder in root.iterdir():
            manifest = read_manifest(folder) if folder.name.isdigit() else None
            if manifest is not None:
                found.append(Version(int(folder.name), folder, manifest, current is not None
                                     and current.get("content") == manifest.get("content")
                                     and current.get("version") == int(folder.name)))
    return sorted(found, key=lambda v: v.number)


def next_version(content: str, versions: list[Version], installed: dict[str, Any] | None, first: int) -> int:
    """The version number of a package with ``content``: a kept version's when equal, else one above every number
    seen (kept or installed), else ``first`` (the recipe's ``foundry.version``)."""
    for v in versions:
        if v.manifest.get("content") == content:
            return v.number
    if installed and installed.get("content") == content and isinstance(installed.get("version"), int):
        return installed["version"]
    numbers = [v.number for v in versions] + ([installed["version"]] if installed and isinstance(
        installed.get("version"), int) else [])
    return max(numbers) + 1 if numbers else first


def _copy_model(src: Path, staging: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Copy the model files of ``src`` into ``staging`` (``inference_model.json`` last: a scanner lists a folder only
    once it is complete), then write the manifest with each copy's size, mtime and hash."""
    files = {}
    for file in sorted(model_files(src), key=lambda p: p.name == INFERENCE_MODEL):
        shutil.copy2(file, staging / file.name)
        st = (staging / file.name).stat()
        files[file.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                            "sha256": manifest["files"][file.name]["sha256"]}
    doc = {**manifest, "files": files}
    write_json_atomic(staging / MANIFEST, doc)
    return doc


def owner_problem(installed: Path, recipe_path: Path, recipe_name: str) -> str | None:
    """Why installing for this recipe would replace another recipe's model (None: it would not)."""
    manifest = read_manifest(installed)
    owner = (manifest or {}).get("recipe") or {}
    if not owner.get("path") or Path(owner["path"]) == Path(recipe_path):
        return None
    return (f"{installed} holds {manifest.get('name')}:{manifest.get('version')} installed by recipe "
            f"{owner.get('name')!r} ({owner['path']}); recipe {recipe_name!r} ({recipe_path}) installs to the same "
            "foundry.publisher/foundry.name. Give one of them another foundry.name, or deploy with --take-over to "
            "replace it (its kept versions stay and can be rolled back to).")


def install_version(package: Path, cache_root: Path, publisher: str, name: str, target: Path, *,
                    recipe: dict[str, Any], first_version: int, keep: int,
                    announce: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Install ``package`` as the current version of ``publisher/name`` at ``target``: keep a copy as version N
    (next number, or a kept version's number when the content is the same), then exchange it into ``target``
    (:func:`atomic_dir`, kill points ``install:*``), then drop versions beyond ``keep`` earlier ones. Hold the
    target's lock. Returns the manifest written."""
    content = content_of(package)
    root = versions_root(cache_root, publisher, name)
    for note in clean_versions(root):
        announce(f"recovered: {note}")
    installed = read_manifest(target) if target.is_dir() else None
    versions = kept_versions(cache_root, publisher, name, target)
    number = next_version(content["content"], versions, installed, first_version)
    manifest = {"name": name, "publisher": publisher, "version": number, "model_id": f"{name}:{number}",
                "content": content["content"], "files": content["files"], "recipe": recipe,
                "installed_at": time.time(), "bytes": sum(f["size"] for f in content["files"].values())}
    archived = root / str(number)
    try:
        if read_manifest(archived) is None or verify(archived, deep=True) is not None:
            with atomic_dir(archived, label="version", durable=True) as staging:
                (staging / SCANNER_SKIP).touch()  # kept versions stay hidden from Foundry's cache scanner
                _copy_model(package, staging, manifest)
        else:
            manifest["installed_at"] = time.time()
        with atomic_dir(target, label="install", hide_marker=SCANNER_SKIP, durable=True) as staging:
            written = _copy_model(archived, staging, manifest)
    except OSError as exc:
        raise InstallError(f"Could not install into {target}: {exc}. Check free space and permissions of "
                           f"{cache_root} (`invoke doctor` checks them; SLMOPS_FOUNDRY_CACHE selects another "
                           "cache).") from exc
    prune(root, number, keep, announce)
    return written


_LEFTOVER = re.compile(r"^\.\d+\.(staging|old)-[0-9a-f]{8}$")


def clean_versions(root: Path) -> list[str]:
    """Remove what a killed version copy or removal left in ``root`` (``.<N>.staging-*``, ``.<N>.old-*``); return
    one line per removal. Hold the model's lock."""
    notes = []
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if _LEFTOVER.match(path.name):
                shutil.rmtree(path, ignore_errors=True)
                notes.append(f"removed {path} (left by an interrupted run)")
    return notes


def prune(root: Path, current: int, keep: int, announce: Callable[[str], None]) -> None:
    """Remove kept versions beyond the ``keep`` newest earlier than ``current`` (and any newer abandoned ones are
    kept: they may be rolled forward to)."""
    numbers = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True) if root.is_dir() else []
    earlier = [n for n in numbers if n < current]
    for n in earlier[keep:]:
        folder = root / str(n)
        retired = root / f".{n}.old-{os.urandom(4).hex()}"
        os.rename(folder, retired)  # one rename: the version is gone or whole, never half-deleted
        shutil.rmtree(retired, ignore_errors=True)
        announce(f"       removed version {n} (recipe foundry.keep_versions {keep})")


def rollback(cache_root: Path, publisher: str, name: str, target: Path, to: int | None = None,
             announce: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Make kept version ``to`` (default: the newest before the current one) current, through the same exchange as an
    install (kill points ``rollback:start``, ``rollback:staged``, ``rollback:swapped``, …). Hold the target's lock."""
    versions = kept_versions(cache_root, publisher, name, target)
    listing = ", ".join(f"{v.number}{' (current)' if v.current else ''}" for v in versions) or "none"
    current = current_version(target)
    if to is None:
        earlier = [v for v in versions if current is None or v.number < current]
        if not earlier:
            raise InstallError(f"{publisher}/{name} has no version before the current one ({current}) to roll back "
                               f"to; kept versions: {listing}. `invoke models` lists them.")
        chosen = earlier[-1]
    else:
        chosen = next((v for v in versions if v.number == int(to)), None)
        if chosen is None:
            raise InstallError(f"{publisher}/{name} has no kept version {to}; kept versions: {listing}. Pass one "
                               "of them to --to (`invoke models` lists them).")
    problem = verify(chosen.folder, deep=True)
    if problem:
        raise InstallError(f"Kept version {chosen.number} of {publisher}/{name} is damaged: {problem}. Roll back to "
                           f"another one ({listing}), or redeploy.")
    checkpoint("rollback:start")
    manifest = {**chosen.manifest, "installed_at": time.time(), "rolled_back_from": current}
    try:
        with atomic_dir(target, label="rollback", hide_marker=SCANNER_SKIP, durable=True) as staging:
            written = _copy_model(chosen.folder, staging, manifest)
    except OSError as exc:
        raise InstallError(f"Could not roll {target} back: {exc}. Check free space and permissions of "
                           f"{cache_root}.") from exc
    announce(f"{publisher}/{name}: version {chosen.number} is current (was {current})")
    return written


def record_proof(cache_root: Path, publisher: str, name: str, installed: Path, proof: dict[str, Any]) -> None:
    """Keep the check's headline figures beside the current version (shown by `invoke models`)."""
    version = current_version(installed)
    folder = versions_root(cache_root, publisher, name) / str(version)
    if version is not None and folder.is_dir():
        try:
            write_json_atomic(folder / PROOF, proof)
        except OSError:
            pass  # a read-only cache: the figures are not kept, nothing else changes


# ----- listing ----------------------------------------------------------------------------------------------------
def installed_models(cache_root: Path) -> list[tuple[str, str, Path]]:
    """``(publisher, name, installed folder)`` of every model with kept versions or an install manifest."""
    out = set()
    base = Path(cache_root) / RUNTIME_DIR_NAME / "versions"
    if base.is_dir():
        out |= {(p.parent.name, p.name) for p in base.glob("*/*") if p.is_dir()}
    if Path(cache_root).is_dir():
        out |= {(p.parent.parent.name, p.parent.name) for p in Path(cache_root).glob(f"*/*/{MANIFEST}")}
    return [(pub, name, Path(cache_root) / pub / name) for pub, name in sorted(out)]


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def models_table(cache_root: Path) -> list[str]:
    """`invoke models`: one line per kept version, at most 80 columns."""
    lines = []
    header = f"{'':1} {'MODEL':<20} {'RECIPE':<10} {'PREC':<5} {'SIZE':>8} {'HASH':<8} {'INSTALLED':<11} {'PROOF':<10}"
    for publisher, name, installed in installed_models(cache_root):
        versions = kept_versions(cache_root, publisher, name, installed)
        if not versions and read_manifest(installed):
            m = read_manifest(installed)
            versions = [Version(m["version"], installed, m, True)]
        for v in versions:
            m = v.manifest
            recipe = m.get("recipe") or {}
            when = time.strftime("%m-%d %H:%M", time.localtime(m.get("installed_at", 0)))
            proof = v.proof.get("headline", "")
            model = f"{publisher}/{name}:{v.number}"
            model = model if len(model) <= 20 else "…" + model[-19:]
            lines.append((f"{'*' if v.current else ' ':1} {model:<20} {str(recipe.get('name', '?'))[:10]:<10} "
                          f"{str(recipe.get('precision', '?'))[:5]:<5} {_size(m.get('bytes', 0)):>8} "
                          f"{m.get('content', '')[:8]:<8} {when:<11} {proof[:10]:<10}").rstrip())
        if not any(v.current for v in versions) and installed.is_dir():
            lines.append(f"  {publisher}/{name}: the installed folder is none of the kept versions "
                         f"({verify(installed) or 'unknown content'})"[:80])
    if not lines:
        return [f"No models installed by SLMOps in {cache_root}."]
    return [header.rstrip()] + lines + [
        "(* = current: what check, run and serve use; `invoke rollback --model R --to N`)"]
