"""Assemble the deployable package and install it into the Foundry Local cache, atomically."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from scripts.core.errors import InstallError
from scripts.core.fileops import atomic_dir, link_or_copy, write_json_atomic

log = logging.getLogger(__name__)

# Files of an Olive/ModelBuilder output that belong in the deployed model (its own bookkeeping does not).
PACKAGE_GLOBS = ("*.onnx", "*.onnx.data", "genai_config.json", "tokenizer*.json", "tokenizer.model", "vocab.json",
                 "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "config.json",
                 "generation_config.json")
INFERENCE_MODEL = "inference_model.json"
REQUIRED = ("model.onnx", "genai_config.json", INFERENCE_MODEL)
#: Foundry Local's cache scanner skips a folder holding this file (upstream ``local_model_scanner.cc``): the staging
#: folder of an install carries it, and so does the old copy before it is removed.
SCANNER_SKIP = "download.tmp"


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


def check_context(package_dir: Path) -> int:
    """The package's ``genai_config.json`` ``model.context_length`` (Foundry Local's limit on prompt + reply), refused
    when missing (the runtime will not load the model) or larger than the positions the graph was built for
    (``config.json`` ``max_position_embeddings``: generation would crash past them)."""
    genai = json.loads((package_dir / "genai_config.json").read_text(encoding="utf-8"))
    context = (genai.get("model") or {}).get("context_length")
    if not isinstance(context, int) or context < 1:
        raise InstallError(f"{package_dir / 'genai_config.json'} has no model.context_length; Foundry Local refuses to "
                           "load such a model (\"model context_length is 0 or was not set\"). Rebuild it: "
                           "`invoke deploy --force`.")
    hf_config = package_dir / "config.json"
    positions = json.loads(hf_config.read_text(encoding="utf-8")).get("max_position_embeddings") \
        if hf_config.is_file() else None
    if isinstance(positions, int) and context > positions:
        raise InstallError(f"{package_dir / 'genai_config.json'}: model.context_length {context} exceeds the "
                           f"{positions} positions the graph was built for (config.json max_position_embeddings): "
                           f"generation would crash past position {positions}. Set it to at most {positions}.")
    return context


def install_dir(cache_root: Path, publisher: str, name: str) -> Path:
    return cache_root / publisher / name


def install_package(package_dir: Path, cache_root: Path, publisher: str, name: str) -> Path:
    """Copy ``package_dir`` to ``<cache_root>/<publisher>/<name>/``: staged beside the target (hidden from the cache
    scanner by :data:`SCANNER_SKIP`), fsynced, then exchanged with the old copy in one atomic rename
    (:func:`~scripts.core.fileops.atomic_dir`), so the target is the old or the new model at every instant and a failed
    copy leaves the old one. Hold the target's lock (:meth:`scripts.pipeline.Pipeline.cache_locked`), which also
    recovers what a killed install left."""
    missing = [f for f in REQUIRED if not (package_dir / f).is_file()]
    if missing:
        raise InstallError(f"{package_dir} is not a complete package (missing {', '.join(missing)}); "
                           "rerun `invoke deploy --force` to rebuild it.")
    check_context(package_dir)
    target = install_dir(cache_root, publisher, name)
    try:
        with atomic_dir(target, label="install", hide_marker=SCANNER_SKIP, durable=True) as staging:
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
    """Models in a Foundry cache folder as its cache scanner sees them (upstream ``local_model_scanner.cc``, checked
    in the Foundry research): every folder at any depth, dot-folders included and symbolic links followed, that holds
    ``genai_config.json`` and an ``inference_model.json`` with a string ``Name``, except a folder holding
    :data:`SCANNER_SKIP`. ``publisher`` is the first folder under the root."""
    found = []
    for folder, subfolders, files in os.walk(cache_root, followlinks=True):
        subfolders.sort()
        if SCANNER_SKIP in files:
            subfolders.clear()
            continue
        if INFERENCE_MODEL not in files or "genai_config.json" not in files:
            continue
        try:
            name = json.loads((Path(folder) / INFERENCE_MODEL).read_text(encoding="utf-8")).get("Name")
        except (json.JSONDecodeError, OSError, AttributeError):
            continue
        if isinstance(name, str):
            parts = Path(folder).relative_to(cache_root).parts
            found.append({"name": name, "publisher": parts[0] if len(parts) > 1 else "", "path": folder})
    return found
