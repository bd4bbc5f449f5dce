"""Issue 21: bad input never gives a traceback. Each case is a real `invoke` process in temporary folders; each must
exit with a one-screen message naming the file, key or path and the fix — or, for a read-only or full cache, still
check and chat. Read-only and full filesystems are real mounts (a read-only bind mount, a small tmpfs), so these
tests need mount rights (root in a container) and are skipped without them. The last test counts tracebacks over all
the runs of this module (target 0)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUNS: list[tuple[str, bool]] = []  # (case, printed a traceback)


@pytest.fixture(scope="module")
def box(tmp_path_factory, tiny_hf_model, tiny_onnx_model):
    root = tmp_path_factory.mktemp("bad-inputs")
    recipes = root / "recipes"
    recipes.mkdir()
    cache = root / "cache"
    shutil.copytree(tiny_onnx_model, cache / "slmops" / "tiny-qwen2")
    (recipes / "tiny.json").write_text(json.dumps(tiny_recipe(tiny_hf_model)))
    env = dict(os.environ, SLMOPS_BUILD_DIR=str(root / "build"), SLMOPS_FOUNDRY_CACHE=str(cache),
               SLMOPS_RECIPES_DIR=str(recipes), HOME=str(root / "home"), XDG_CACHE_HOME=str(root / "home/.cache"),
               HF_HUB_OFFLINE="1", COLUMNS="250", PYTHONUNBUFFERED="1")
    return {"root": root, "recipes": recipes, "cache": cache, "env": env, "hf": tiny_hf_model}


def tiny_recipe(source, **changes) -> dict:
    doc = {"model": {"source": str(source), "family": "auto"}, "foundry": {"name": "tiny-qwen2"}}
    for key, value in changes.items():
        section, _, name = key.partition("__")
        doc.setdefault(section, {})[name] = value
    return doc


def invoke(box, case: str, *args, stdin: str | None = None, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, env={**box["env"], **env},
                          capture_output=True, text=True, timeout=600, input=stdin)
    traceback = "Traceback (most recent call last)" in proc.stdout + proc.stderr
    RUNS.append((case, traceback))
    assert not traceback, proc.stdout + proc.stderr
    return proc


def message(proc) -> str:
    return " ".join(proc.stderr.split())


def failed_with(proc, *parts: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = message(proc)
    assert text.startswith("error: "), text
    for part in parts:
        assert part in text, text
    assert len(proc.stderr.splitlines()) <= 25, "one screen"


# ----- recipes ----------------------------------------------------------------------------------------------------
def test_a_duplicate_key_is_an_error_with_its_key_path(box):
    path = box["recipes"] / "dup.json"
    path.write_text('{"model": {"source": "%s"}, "foundry": {"name": "dup"},\n'
                    ' "conversion": {"precision": "int4", "precision": "fp32"}}' % box["hf"])
    proc = invoke(box, "duplicate key", "deploy", "--model", "dup", "--skip-proof")
    failed_with(proc, f"{path}: the key conversion.precision appears twice in the same object", "Keep one of them")


def test_a_50_mb_description_is_refused_before_reading_it(box):
    path = box["recipes"] / "huge.json"
    path.write_text(json.dumps(tiny_recipe(box["hf"], foundry__description="x" * (50 << 20))))
    proc = invoke(box, "50 MB recipe", "deploy", "--model", "huge", "--skip-proof")
    failed_with(proc, f"{path}: the recipe file is {path.stat().st_size:,} bytes; the limit is 1,048,576")


def test_a_long_free_text_key_is_refused_naming_it(box):
    (box["recipes"] / "long.json").write_text(json.dumps(tiny_recipe(box["hf"], foundry__description="y" * 5000)))
    proc = invoke(box, "long description", "deploy", "--model", "long", "--skip-proof")
    failed_with(proc, "foundry.description: 5,000 characters; the limit is 4,096")


# ----- model folders ------------------------------------------------------------------------------------------------
def test_an_invalid_tokenizer_json_is_named(box, tmp_path):
    broken = shutil.copytree(box["hf"], tmp_path / "broken")
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", ')
    (box["recipes"] / "badtok.json").write_text(json.dumps(tiny_recipe(broken, foundry__name="badtok")))
    proc = invoke(box, "invalid tokenizer.json", "deploy", "--model", "badtok", "--skip-proof")
    failed_with(proc, f"{broken / 'tokenizer.json'}: not valid JSON (line 1,", "tokenizer.save_pretrained(")
    assert "▶ convert" in proc.stdout and not (box["root"] / "build" / "badtok" / "onnx").exists(), "before Olive"


def test_a_model_path_symlink_loop_is_named(box, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    proc = invoke(box, "--model-path symlink loop", "deploy", "--model", "tiny", "--model-path", str(loop),
                  "--skip-proof")
    failed_with(proc, f"--model-path: '{loop}' cannot be followed", "link loop")


# ----- the cache --------------------------------------------------------------------------------------------------------
def test_a_cache_that_is_a_file_is_named(box, tmp_path):
    file = tmp_path / "cache-file"
    file.write_text("not a folder")
    proc = invoke(box, "cache is a file", "check", "--model", "tiny", SLMOPS_FOUNDRY_CACHE=str(file))
    failed_with(proc, f"The Foundry cache {file} (SLMOPS_FOUNDRY_CACHE) is a file, not a folder")
    doctor = invoke(box, "doctor on a cache that is a file", "doctor", SLMOPS_FOUNDRY_CACHE=str(file))
    assert doctor.returncode == 1 and f"{file} is a file, not a folder" in " ".join(message(doctor).split())


def mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here ({proc.stderr.strip()}): needs root in a container")


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def read_only_cache(box, tmp_path):
    cache = shutil.copytree(box["cache"], tmp_path / "ro-cache", symlinks=True)
    mount("--bind", str(cache), str(cache))
    try:
        mount("-o", "remount,bind,ro", str(cache))
        yield cache
    finally:
        umount(cache)


def test_a_read_only_cache_still_checks_and_chats(box, read_only_cache):
    with pytest.raises(OSError):
        (read_only_cache / "probe").touch()
    check = invoke(box, "check on a read-only cache", "check", "--model", "tiny",
                   SLMOPS_FOUNDRY_CACHE=str(read_only_cache))
    assert check.returncode == 0, check.stdout + check.stderr
    out = " ".join(check.stdout.split())
    assert "no lock taken" in out and "listed │ yes" in out.replace("  ", " ") or "│ yes" in out
    chat = invoke(box, "run on a read-only cache", "run", "--model", "tiny", "--max-tokens", "4",
                  SLMOPS_FOUNDRY_CACHE=str(read_only_cache), stdin="Hello\n/exit\n")
    assert chat.returncode == 0, chat.stdout + chat.stderr
    deploy = invoke(box, "deploy on a read-only cache", "deploy", "--model", "tiny", "--skip-proof",
                    SLMOPS_FOUNDRY_CACHE=str(read_only_cache))
    failed_with(deploy, f"Cannot install into the Foundry cache: {read_only_cache} is not writable")
    doctor = invoke(box, "doctor on a read-only cache", "doctor", SLMOPS_FOUNDRY_CACHE=str(read_only_cache))
    assert doctor.returncode == 1 and f"{read_only_cache} is not writable" in message(doctor)


@pytest.fixture
def full_cache(box, tmp_path):
    cache = tmp_path / "full-cache"
    cache.mkdir()
    size = sum(p.stat().st_size for p in box["cache"].rglob("*") if p.is_file())
    mount("-t", "tmpfs", "-o", f"size={size + (1 << 20)}", "tmpfs", str(cache))
    try:
        shutil.copytree(box["cache"], cache, dirs_exist_ok=True)
        with open(cache / "filler", "wb") as fh:  # fill it to the last byte
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        yield cache
    finally:
        umount(cache)


def test_a_full_cache_still_checks_and_a_deploy_says_it_is_full(box, full_cache):
    check = invoke(box, "check on a full cache", "check", "--model", "tiny", SLMOPS_FOUNDRY_CACHE=str(full_cache))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "│ answer" in check.stdout
    deploy = invoke(box, "deploy on a full cache", "deploy", "--model", "tiny", "--skip-proof",
                    SLMOPS_FOUNDRY_CACHE=str(full_cache))
    assert deploy.returncode == 1
    assert "No space left on device" in message(deploy) and "free space" in message(deploy).lower()


def test_zz_no_tracebacks_across_the_bad_input_suite():
    """Runs after the others (file order): every `invoke` of this module, counted."""
    assert RUNS, "the other tests ran no command"
    with_traceback = [case for case, tb in RUNS if tb]
    print(f"\nbad-input suite: {len(RUNS)} commands, {len(with_traceback)} tracebacks")
    assert with_traceback == []
