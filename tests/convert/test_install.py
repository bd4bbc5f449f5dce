"""Tests for scripts/convert/install.py: assembling the package and installing it atomically into a Foundry cache."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scripts.convert import install
from scripts.core.errors import InstallError
from scripts.convert.install import assemble_package, install_dir, install_package, list_cache, package_files


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SLMOPS_FOUNDRY_CACHE", str(root))
    return root


def make_package(folder: Path, name: str = "my-model", extra: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True)
    files = {"model.onnx": "graph", "model.onnx.data": "weights",
             "genai_config.json": '{"model": {"context_length": 512}, "search": {}}',
             "tokenizer.json": "{}", "inference_model.json": json.dumps({"Name": name}), **(extra or {})}
    for file, text in files.items():
        (folder / file).write_text(text)
    return folder


def hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")] if folder.is_dir() else []


# ----- install_package -----------------------------------------------------------------------------------------
def test_install_creates_publisher_name_folder_with_the_files(tmp_path, cache):
    package = make_package(tmp_path / "package")
    target = install_package(package, cache, "slmops", "my-model")
    assert target == install_dir(cache, "slmops", "my-model") == cache / "slmops" / "my-model"
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in package.iterdir())
    assert (target / "model.onnx.data").read_text() == "weights"
    assert (target / "model.onnx").stat().st_ino != (package / "model.onnx").stat().st_ino, "a copy, not a link"
    assert hidden(cache / "slmops") == []


def test_reinstall_replaces_cleanly(tmp_path, cache):
    install_package(make_package(tmp_path / "v1", extra={"stale.txt": "old"}), cache, "slmops", "m")
    second = make_package(tmp_path / "v2")
    (second / "model.onnx").write_text("graph v2")
    target = install_package(second, cache, "slmops", "m")
    assert not (target / "stale.txt").exists()
    assert (target / "model.onnx").read_text() == "graph v2"
    assert sorted(p.name for p in (cache / "slmops").iterdir()) == ["m"]


def test_failure_mid_copy_keeps_previous_install(tmp_path, cache, monkeypatch):
    install_package(make_package(tmp_path / "v1"), cache, "slmops", "m")
    before = {p.name: p.read_text() for p in (cache / "slmops" / "m").iterdir()}
    second = make_package(tmp_path / "v2")
    (second / "model.onnx").write_text("graph v2")

    real_copy = shutil.copy2
    copied = []

    def copy_then_fail(src, dst, *args, **kwargs):
        if copied:
            raise OSError(28, "No space left on device")
        copied.append(src)
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(install.shutil, "copy2", copy_then_fail)
    with pytest.raises(InstallError) as info:
        install_package(second, cache, "slmops", "m")
    message = str(info.value)
    assert f"Could not install into {cache / 'slmops' / 'm'}" in message
    assert "No space left on device" in message and "SLMOPS_FOUNDRY_CACHE" in message
    assert len(copied) == 1
    assert {p.name: p.read_text() for p in (cache / "slmops" / "m").iterdir()} == before
    assert hidden(cache / "slmops") == [], "no staging folder left behind"


def test_inference_model_is_copied_last(tmp_path, cache, monkeypatch):
    order = []
    real_copy = shutil.copy2
    monkeypatch.setattr(install.shutil, "copy2", lambda s, d: (order.append(Path(s).name), real_copy(s, d))[1])
    install_package(make_package(tmp_path / "p", extra={"zzz.json": "{}"}), cache, "slmops", "m")
    assert order[-1] == "inference_model.json"
    assert len(order) == 6


@pytest.mark.parametrize("missing", ["model.onnx", "genai_config.json", "inference_model.json"])
def test_incomplete_package_is_refused(tmp_path, cache, missing):
    package = make_package(tmp_path / "p")
    (package / missing).unlink()
    with pytest.raises(InstallError) as info:
        install_package(package, cache, "slmops", "m")
    assert f"{package} is not a complete package (missing {missing})" in str(info.value)
    assert "invoke deploy --force" in str(info.value)
    assert not (cache / "slmops").exists()


def test_a_package_without_context_length_is_refused(tmp_path, cache):
    package = make_package(tmp_path / "p", extra={"genai_config.json": '{"model": {}, "search": {}}'})
    with pytest.raises(InstallError, match=r"has no model.context_length; Foundry Local refuses to load such a model"):
        install_package(package, cache, "slmops", "m")
    assert not (cache / "slmops" / "m").exists()


def test_a_context_longer_than_the_graphs_positions_is_refused(tmp_path, cache):
    package = make_package(tmp_path / "p", extra={"genai_config.json": '{"model": {"context_length": 4096}}',
                                                  "config.json": '{"max_position_embeddings": 512}'})
    with pytest.raises(InstallError) as info:
        install_package(package, cache, "slmops", "m")
    assert ("model.context_length 4096 exceeds the 512 positions the graph was built for (config.json "
            "max_position_embeddings): generation would crash past position 512") in str(info.value)
    (package / "genai_config.json").write_text('{"model": {"context_length": 512}}')
    assert install.check_context(package) == 512
    install_package(package, cache, "slmops", "m")


# ----- list_cache --------------------------------------------------------------------------------------------
def test_list_cache_sees_what_the_foundry_scanner_sees(tmp_path, cache):
    """Like upstream's scanner: any depth, dot-folders too, symlinks followed; a folder holding download.tmp is
    skipped (so are its subfolders); a folder needs genai_config.json and a string Name."""
    install_package(make_package(tmp_path / "a", name="alpha"), cache, "slmops", "alpha")
    install_package(make_package(tmp_path / "b", name="beta"), cache, "other", "beta")
    alpha = cache / "slmops" / "alpha"
    shutil.copytree(alpha, cache / "slmops" / ".alpha.staging-12345678")            # a visible leftover
    hidden_copy = cache / "slmops" / ".alpha.staging-9abcdef0"
    shutil.copytree(alpha, hidden_copy / "nested")
    (hidden_copy / install.SCANNER_SKIP).touch()                                     # skipped with its subfolders
    (cache / "links").mkdir()
    (cache / "links" / "alpha-link").symlink_to(alpha)                               # followed
    for bad, change in (("no-name", lambda d: (d / "inference_model.json").write_text('{"Name": 3}')),
                        ("broken", lambda d: (d / "inference_model.json").write_text("{not json")),
                        ("no-genai", lambda d: (d / "genai_config.json").unlink())):
        shutil.copytree(alpha, cache / "slmops" / bad)
        change(cache / "slmops" / bad)

    assert list_cache(cache) == [
        {"name": "alpha", "publisher": "links", "path": str(cache / "links" / "alpha-link")},
        {"name": "beta", "publisher": "other", "path": str(cache / "other" / "beta")},
        {"name": "alpha", "publisher": "slmops", "path": str(cache / "slmops" / ".alpha.staging-12345678")},
        {"name": "alpha", "publisher": "slmops", "path": str(alpha)},
    ]


def test_list_cache_of_missing_folder_is_empty(tmp_path):
    assert list_cache(tmp_path / "nothing") == []


# ----- assemble_package ----------------------------------------------------------------------------------------
def test_assemble_package_ships_model_files_and_rendered_configs(tmp_path):
    onnx = make_package(tmp_path / "onnx", extra={"olive_config.json": "{}", "footprint.json": "{}",
                                                  "merges.txt": "m", "chat_template.jinja": "t"})
    (onnx / "inference_model.json").unlink()
    (onnx / "cache").mkdir()
    names = [p.name for p in package_files(onnx)]
    assert names == sorted(names)
    assert "olive_config.json" not in names and "footprint.json" not in names
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "merges.txt",
            "chat_template.jinja"} == set(names)

    genai = {"model": {"context_length": 128}, "search": {"max_length": 128}}
    package = assemble_package(onnx, tmp_path / "package", genai, {"Name": "n"})
    assert sorted(p.name for p in package.iterdir()) == sorted(set(names) | {"inference_model.json"})
    assert json.loads((package / "genai_config.json").read_text()) == genai
    assert json.loads((onnx / "genai_config.json").read_text()) == {"model": {"context_length": 512}, "search": {}}, \
        "the source is not modified"
    assert json.loads((package / "inference_model.json").read_text()) == {"Name": "n"}
    assert (package / "model.onnx.data").stat().st_ino == (onnx / "model.onnx.data").stat().st_ino, "hard-linked"
    install_package(package, tmp_path / "cache", "p", "n")  # a complete package
