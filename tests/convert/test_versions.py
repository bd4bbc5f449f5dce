"""scripts.convert.versions without the runtime: manifests, fast and deep verification, numbering, ownership, pruning,
rollback (with its kill points in tests/test_versions.py), the 80-column listing; scripts.core.jsonfile."""
from __future__ import annotations

import json
import os

import pytest

from scripts.convert import versions as v
from scripts.core.errors import InstallError, RecipeError
from scripts.core.jsonfile import read_json_strict, text_limit


def package(tmp_path, name="pkg", data=b"weights" * 100):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"graph")
    (folder / "model.onnx.data").write_bytes(data)
    (folder / "genai_config.json").write_text(json.dumps({"model": {"context_length": 64}}))
    (folder / "inference_model.json").write_text(json.dumps({"Name": "m"}))
    return folder


def install(tmp_path, pkg, keep=2, recipe="r"):
    cache = tmp_path / "cache"
    return v.install_version(pkg, cache, "pub", "m", cache / "pub" / "m", recipe={"name": recipe, "path": f"/{recipe}.json"},
                             first_version=1, keep=keep)


def test_install_writes_a_manifest_and_keeps_a_hidden_copy(tmp_path):
    manifest = install(tmp_path, package(tmp_path))
    target = tmp_path / "cache" / "pub" / "m"
    assert manifest["version"] == 1 and v.read_manifest(target)["model_id"] == "m:1"
    kept = v.versions_root(tmp_path / "cache", "pub", "m") / "1"
    assert (kept / v.SCANNER_SKIP).is_file() and v.verify(kept) is None and v.verify(target) is None
    assert not (target / v.SCANNER_SKIP).exists()


def test_verify_fast_finds_a_cut_file_and_deep_finds_changed_bytes(tmp_path):
    install(tmp_path, package(tmp_path))
    target = tmp_path / "cache" / "pub" / "m"
    data = target / "model.onnx.data"
    st = data.stat()
    data.write_bytes(b"X" * st.st_size)  # same size, other bytes
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime: only the hash can tell
    assert v.verify(target) is None
    assert "does not hold what was installed" in v.verify(target, deep=True)
    with open(data, "r+b") as fh:
        fh.truncate(10)
    assert f"{data} is 10 bytes; the install wrote {st.st_size:,} bytes" in v.verify(target)
    (target / "extra.bin").write_bytes(b"")
    data.unlink()
    assert "model.onnx.data is missing" in v.verify(target)


def test_changed_content_is_the_next_version_and_known_content_keeps_its_number(tmp_path):
    assert install(tmp_path, package(tmp_path, "a"))["version"] == 1
    assert install(tmp_path, package(tmp_path, "b", b"other"))["version"] == 2
    assert install(tmp_path, package(tmp_path, "c"))["version"] == 1, "version 1's content again"
    assert install(tmp_path, package(tmp_path, "d", b"third"))["version"] == 3


def test_keep_prunes_the_oldest_earlier_versions(tmp_path):
    for i, data in enumerate((b"1", b"2", b"3", b"4")):
        install(tmp_path, package(tmp_path, f"p{i}", data), keep=1)
    root = v.versions_root(tmp_path / "cache", "pub", "m")
    assert sorted(p.name for p in root.iterdir()) == ["3", "4"]


def test_another_recipes_install_is_named(tmp_path):
    install(tmp_path, package(tmp_path), recipe="first")
    target = tmp_path / "cache" / "pub" / "m"
    assert v.owner_problem(target, "/first.json", "first") is None
    problem = v.owner_problem(target, "/second.json", "second")
    assert "installed by recipe 'first' (/first.json); recipe 'second' (/second.json) installs to the same" in problem


def test_rollback_defaults_to_the_previous_version_and_refuses_a_damaged_one(tmp_path):
    install(tmp_path, package(tmp_path, "a"))
    install(tmp_path, package(tmp_path, "b", b"other"))
    cache, target = tmp_path / "cache", tmp_path / "cache" / "pub" / "m"
    assert v.rollback(cache, "pub", "m", target)["version"] == 1
    assert (target / "model.onnx.data").read_bytes() == b"weights" * 100
    with pytest.raises(InstallError, match=r"no version before the current one \(1\)"):
        v.rollback(cache, "pub", "m", target)
    (v.versions_root(cache, "pub", "m") / "2" / "model.onnx").write_bytes(b"broken")
    with pytest.raises(InstallError, match="Kept version 2 of pub/m is damaged"):
        v.rollback(cache, "pub", "m", target, to=2)


def test_the_listing_fits_80_columns_and_marks_one_current(tmp_path):
    install(tmp_path, package(tmp_path, "a"))
    install(tmp_path, package(tmp_path, "b", b"other"))
    lines = v.models_table(tmp_path / "cache")
    assert all(len(line) <= 80 for line in lines)
    assert [line[:10] for line in lines if line.startswith("*")] == ["* pub/m:2 "]
    assert lines[0].split() == ["MODEL", "RECIPE", "PREC", "SIZE", "HASH", "INSTALLED", "PROOF"]


def test_duplicate_keys_are_named_with_their_path(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"a": {"b": [{"c": 1, "c": 2}]}, "d": 1, "d": 2}')
    with pytest.raises(RecipeError, match=r"the key d appears twice .* \(also: a\.b\[0\]\.c\)"):
        read_json_strict(path)
    path.write_text('{"a": 1}')
    assert read_json_strict(path) == {"a": 1} and type(read_json_strict(path)) is dict


def test_size_limits(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"x": "y" * 2000}))
    with pytest.raises(RecipeError, match="the limit is 1,000"):
        read_json_strict(path, max_bytes=1000)
    assert text_limit("z" * 4096) is None and "5,000 characters" in text_limit("z" * 5000)
