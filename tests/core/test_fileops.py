"""Tests for scripts/core/fileops.py: content hashes, atomic JSON writes, hard links, atomic directory replacement."""
from __future__ import annotations

import errno
import json
import os

import pytest

from scripts.core import fileops
from scripts.core.fileops import (atomic_dir, exchange, folder_size, hash_json, hash_path, link_or_copy, recover_dir,
                             write_json_atomic)


def test_file_hash_changes_with_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    first = hash_path(f)
    assert first == hash_path(f)
    assert len(first) == 64
    f.write_text("hello, world")
    assert hash_path(f) != first
    f.write_text("hello")
    assert hash_path(f) == first, "same content, same hash"


def test_same_content_in_two_files_hashes_alike(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "b").write_bytes(b"x" * 10)
    (tmp_path / "c").write_bytes(b"y" * 10)
    assert hash_path(tmp_path / "a") == hash_path(tmp_path / "b") != hash_path(tmp_path / "c")


def test_folder_hash_covers_contents_and_names(tmp_path):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "one.txt").write_text("1")
    (folder / "sub" / "two.txt").write_text("2")
    base = hash_path(folder)
    assert hash_path(folder) == base
    (folder / "sub" / "two.txt").write_text("22")
    changed_content = hash_path(folder)
    assert changed_content != base
    (folder / "sub" / "two.txt").rename(folder / "sub" / "three.txt")
    assert hash_path(folder) not in (base, changed_content)
    (folder / "new.txt").write_text("")
    assert hash_path(folder) != changed_content


def test_missing_path_has_a_fixed_hash_that_changes_when_it_appears(tmp_path):
    assert hash_path(tmp_path / "nope") == "missing"
    (tmp_path / "nope").write_text("")
    assert hash_path(tmp_path / "nope") != "missing"


def test_hash_json_ignores_key_order_but_not_values():
    assert hash_json({"a": 1, "b": [1, 2]}) == hash_json({"b": [1, 2], "a": 1})
    assert hash_json({"a": 1}) != hash_json({"a": 2})
    assert hash_json([1, 2]) != hash_json([2, 1])


def test_write_json_atomic_leaves_no_temp_and_breaks_hard_links(tmp_path):
    target = tmp_path / "deep" / "config.json"
    write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    link = tmp_path / "link.json"
    os.link(target, link)
    write_json_atomic(target, {"a": 2, "ü": "ok"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": 2, "ü": "ok"}
    assert json.loads(link.read_text()) == {"a": 1}, "a hard link to the old content must be left untouched"
    assert sorted(p.name for p in target.parent.iterdir()) == ["config.json"]


def test_link_or_copy_links_when_possible(tmp_path):
    src = tmp_path / "src"
    src.write_text("data")
    link_or_copy(src, tmp_path / "dst")
    assert (tmp_path / "dst").read_text() == "data"
    assert (tmp_path / "dst").stat().st_ino == src.stat().st_ino


def test_link_or_copy_copies_when_linking_fails(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError("cross-device link")

    monkeypatch.setattr(fileops.os, "link", no_links)
    src = tmp_path / "src"
    src.write_text("data")
    link_or_copy(src, tmp_path / "dst")
    assert (tmp_path / "dst").read_text() == "data"
    assert (tmp_path / "dst").stat().st_ino != src.stat().st_ino


def test_atomic_dir_creates_final(tmp_path):
    final = tmp_path / "parent" / "out"
    with atomic_dir(final) as staging:
        assert staging.parent == final.parent and staging.name.startswith(".out.staging-")
        assert not final.exists()
        (staging / "f.txt").write_text("new")
    assert (final / "f.txt").read_text() == "new"
    assert sorted(p.name for p in final.parent.iterdir()) == ["out"]


def test_atomic_dir_replaces_final_completely(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as staging:
        (staging / "new.txt").write_text("new")
        assert (final / "old.txt").exists(), "the old folder stays visible until the swap"
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_dir_leaves_final_intact_on_exception(tmp_path, exc):
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("precious")
    with pytest.raises(type(exc)):
        with atomic_dir(final) as staging:
            (staging / "half.txt").write_text("half")
            raise exc
    assert sorted(p.name for p in final.iterdir()) == ["keep.txt"]
    assert (final / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no staging folder left behind"


def test_atomic_dir_failure_without_previous_final(tmp_path):
    with pytest.raises(ValueError):
        with atomic_dir(tmp_path / "out"):
            raise ValueError
    assert list(tmp_path.iterdir()) == []


def make_dir(path, **files):
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_exchange_swaps_two_folders_in_place(tmp_path):
    a, b = make_dir(tmp_path / "a", v="a"), make_dir(tmp_path / "b", v="b")
    inodes = (a.stat().st_ino, b.stat().st_ino)
    exchange(a, b)
    assert ((a / "v").read_text(), (b / "v").read_text()) == ("b", "a")
    assert (a.stat().st_ino, b.stat().st_ino) == inodes[::-1]
    with pytest.raises(OSError) as info:
        exchange(a, tmp_path / "missing")
    assert info.value.errno == errno.ENOENT


def test_atomic_dir_exchanges_with_the_old_folder(tmp_path, monkeypatch):
    final = make_dir(tmp_path / "out", v="old")
    calls = []
    real = fileops.exchange
    monkeypatch.setattr(fileops, "exchange", lambda a, b: (calls.append((a.name, b.name)), real(a, b)))
    with atomic_dir(final) as staging:
        (staging / "v").write_text("new")
    assert calls == [(staging.name, "out")]
    assert (final / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS])
def test_atomic_dir_without_exchange_uses_two_renames(tmp_path, monkeypatch, code):
    final = make_dir(tmp_path / "out", v="old")

    def unsupported(a, b):
        raise OSError(code, "no RENAME_EXCHANGE here")

    monkeypatch.setattr(fileops, "exchange", unsupported)
    with atomic_dir(final) as staging:
        (staging / "v").write_text("new")
    assert (final / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_other_exchange_errors_keep_the_old_folder(tmp_path, monkeypatch):
    final = make_dir(tmp_path / "out", v="old")

    def cross_device(a, b):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(fileops, "exchange", cross_device)
    with pytest.raises(OSError):
        with atomic_dir(final) as staging:
            (staging / "v").write_text("new")
    assert (final / "v").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_hide_marker_stays_until_the_swap(tmp_path):
    final = make_dir(tmp_path / "out", v="old")
    with atomic_dir(final, hide_marker="download.tmp", durable=True) as staging:
        assert (staging / "download.tmp").is_file()
        (staging / "v").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["v"]


def test_recover_dir_puts_back_the_old_copy_of_an_interrupted_two_rename_swap(tmp_path):
    make_dir(tmp_path / ".out.old-0123abcd", v="old")
    make_dir(tmp_path / ".out.staging-0123abcd", v="new")
    notes = recover_dir(tmp_path / "out")
    assert ((tmp_path / "out" / "v").read_text()) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert notes[0] == (f"restored {tmp_path / 'out'} from .out.old-0123abcd (a replacement was killed after moving "
                        "the old copy aside)")
    assert notes[1] == f"removed {tmp_path / '.out.staging-0123abcd'} (left by an interrupted run)"


def test_recover_dir_removes_leftovers_and_nothing_else(tmp_path):
    make_dir(tmp_path / "out", v="current")
    make_dir(tmp_path / ".out.staging-00000001")
    make_dir(tmp_path / ".out.old-00000002", v="older")
    keep = [make_dir(tmp_path / ".other.staging-00000003"), make_dir(tmp_path / ".out.staging-not-hex"),
            tmp_path / ".out.lock"]
    keep[-1].write_text("")
    notes = recover_dir(tmp_path / "out")
    assert len(notes) == 2 and all(n.startswith("removed ") for n in notes)
    assert (tmp_path / "out" / "v").read_text() == "current"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + [k.name for k in keep])
    assert recover_dir(tmp_path / "out") == []
    assert recover_dir(tmp_path / "nowhere" / "out") == []


def test_folder_size(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"x" * 5)
    assert folder_size(tmp_path) == 15
