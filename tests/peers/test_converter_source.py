"""Tests for scripts/peers/converter_source.py: which sdist members make llama.cpp's converter, extraction (atomic,
cached) and the download command. No network: the sdist is a hand-made tarball and pip is faked."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from scripts.core.errors import PeerError
from scripts.peers import converter_source
from scripts.peers.converter_source import complete, ensure_converter, extract_converter, sdist_name, wanted

ROOT = "llama_cpp_python-9.9.9/vendor/llama.cpp/"


def make_sdist(path: Path, members: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


GOOD = {ROOT + "convert_hf_to_gguf.py": "print('converter')", ROOT + "conversion/__init__.py": "",
        ROOT + "conversion/qwen.py": "x = 1", ROOT + "gguf-py/gguf/__init__.py": "", ROOT + "gguf-py/gguf/constants.py": "",
        ROOT + "ggml/src/ggml.c": "int x;", ROOT + "conversion/README.md": "no", "llama_cpp_python-9.9.9/setup.py": ""}


@pytest.mark.parametrize("member, expected", [
    (ROOT + "convert_hf_to_gguf.py", "convert_hf_to_gguf.py"),
    (ROOT + "conversion/qwen.py", "conversion/qwen.py"),
    (ROOT + "gguf-py/gguf/scripts/gguf_dump.py", "gguf-py/gguf/scripts/gguf_dump.py"),
    (ROOT + "conversion/README.md", None),
    (ROOT + "convert_lora_to_gguf.py", None),
    (ROOT + "ggml/src/ggml.c", None),
    ("llama_cpp_python-9.9.9/llama_cpp/llama.py", None),
    (ROOT + "conversion/../../../evil.py", None),
])
def test_wanted_members(member, expected):
    assert wanted(member) == expected


def test_extract_keeps_only_the_converter(tmp_path):
    target = extract_converter(make_sdist(tmp_path / "s.tar.gz", GOOD), tmp_path / "conv")
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == ["conversion/__init__.py", "conversion/qwen.py", "convert_hf_to_gguf.py",
                     "gguf-py/gguf/__init__.py", "gguf-py/gguf/constants.py"]
    assert complete(target)


def test_an_sdist_without_the_converter_is_a_clear_error_and_leaves_nothing(tmp_path):
    bad = make_sdist(tmp_path / "s.tar.gz", {ROOT + "conversion/__init__.py": ""})
    with pytest.raises(PeerError, match="has no vendor/llama.cpp/convert_hf_to_gguf.py"):
        extract_converter(bad, tmp_path / "conv")
    assert not (tmp_path / "conv").exists() and list(tmp_path.iterdir()) == [bad]


def test_a_corrupt_sdist_says_to_delete_it(tmp_path):
    bad = tmp_path / "s.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(PeerError, match="Delete it and run again"):
        extract_converter(bad, tmp_path / "conv")


def test_ensure_downloads_once_then_reuses(tmp_path):
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        make_sdist(Path(cmd[cmd.index("-d") + 1]) / sdist_name("9.9.9"), GOOD)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    first = ensure_converter("9.9.9", tmp_path, run=fake_pip)
    assert calls == [[sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                      "llama-cpp-python==9.9.9", "-d", str(tmp_path)]]
    assert complete(first) and first == converter_source.converter_dir("9.9.9", tmp_path)
    assert ensure_converter("9.9.9", tmp_path, run=fake_pip) == first and len(calls) == 1, "cached"


def test_a_failed_download_is_a_clear_error(tmp_path):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    with pytest.raises(PeerError) as info:
        ensure_converter("9.9.9", tmp_path, run=failing_pip)
    assert "pip download" in str(info.value) and "No matching distribution" in str(info.value)
