"""Assemble the deployable package and install it into the Foundry Local cache, atomically."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from scripts.errors import InstallError
from scripts.fileops import atomic_dir, link_or_copy, write_json_atomic

log = logging.getLogger(__name__)

# Files of an Olive/ModelBuilder output that belong in the deployed model (its own bookkeeping does not).
PACKAGE_GLOBS = ("*.onnx", "*.onnx.data", "genai_config.json", "tokenizer*.json", "tokenizer.model", "vocab.json",
                 "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "config.json",
                 "generation_config.json")
INFERENCE_MODEL = "inference_model.json"
REQUIRED = ("model.onnx", "genai_config.json", INFERENCE_MODEL)


def package_files(onnx_dir: Path) -> list[Path]:
    """The files of a converted model that are shipped (sorted, no duplicates)."""
    return sorted({p for pattern in PACKAGE_GLOBS for p in onnx_dir.glob(pattern) if p.is_file()})


def assemble_package(onnx_dir: Path, package_dir: Path, genai_config: dict[str, Any],
                     inference_model: dict[str, Any], extra_files: dict[str, str] | None = None) -> Path:
    """Write ``package_dir`` atomically: the converted files (hard-linked), plus the rendered configs and any
    ``extra_files`` (name → text, e.g. the family's chat template for a tokenizer that has none)."""
    with atomic_dir(package_dir) as staging:
        for file in package_files(onnx_dir):
            if file.name != "genai_config.json":
                link_or_copy(file, staging / file.name)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        write_json_atomic(staging / "genai_config.json", genai_config)
        write_json_atomic(staging / INFERENCE_MODEL, inference_model)
    return package_dir


def install_dir(cache_root: Path, publisher: str, name: str) -> Path:
    return cache_root / publisher / name


def install_package(package_dir: Path, cache_root: Path, publisher: str, name: str) -> Path:
    """Copy ``package_dir`` to ``<cache_root>/<publisher>/<name>/``. The copy is staged beside the target and
    swapped in by rename, so a half-copied model is never visible and a failed copy leaves the old one."""
    missing = [f for f in REQUIRED if not (package_dir / f).is_file()]
    if missing:
        raise InstallError(f"{package_dir} is not a complete package (missing {', '.join(missing)}); "
                           "rerun `invoke deploy --force` to rebuild it.")
    target = install_dir(cache_root, publisher, name)
    try:
        with atomic_dir(target) as staging:
            files = sorted(p for p in package_dir.iterdir() if p.is_file())
            # inference_model.json last: a scanner only lists a folder once it is complete.
            for file in sorted(files, key=lambda p: p.name == INFERENCE_MODEL):
                shutil.copy2(file, staging / file.name)
    except OSError as exc:
        raise InstallError(f"Could not install into {target}: {exc}. Check free space and permissions of "
                           f"{cache_root} (set SLMOPS_FOUNDRY_CACHE to use another cache).") from exc
    log.info("Installed %s", target)
    return target


def list_cache(cache_root: Path) -> list[dict[str, str]]:
    """Models in a Foundry cache folder, as the v1 CLI's `foundry cache ls` sees them: ``<publisher>/<name>/``
    holding ``genai_config.json`` and an ``inference_model.json`` with a string ``Name``."""
    found = []
    for model_dir in sorted(cache_root.glob("*/*")):
        if model_dir.name.startswith(".") or model_dir.parent.name.startswith("."):
            continue
        info = model_dir / INFERENCE_MODEL
        if info.is_file() and (model_dir / "genai_config.json").is_file():
            try:
                name = json.loads(info.read_text(encoding="utf-8")).get("Name")
            except json.JSONDecodeError:
                continue
            if isinstance(name, str):
                found.append({"name": name, "publisher": model_dir.parent.name, "path": str(model_dir)})
    return found
