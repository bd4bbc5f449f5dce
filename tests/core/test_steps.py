"""Tests for scripts/core/steps.py: Make-style skipping by content hash of inputs, settings, code and outputs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from scripts.core.errors import StepError
from scripts.core.settings import REPO_ROOT
from scripts.core.steps import Step, StepRunner, code_fingerprint, module_closure


class Work:
    """A step body that counts its runs and writes an output file."""

    def __init__(self, output: Path, fail: bool = False):
        self.output, self.fail, self.runs = output, fail, 0

    def __call__(self):
        self.runs += 1
        if self.fail:
            raise RuntimeError("step failed")
        self.output.write_text(f"run {self.runs}")
        return {"runs": self.runs, "path": self.output}


@pytest.fixture
def probe_package(tmp_path, monkeypatch):
    """A throw-away package: ``<pkg>.code`` imports ``<pkg>.helper`` inside a function."""
    name = f"slmops_probe_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / "src" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "code.py").write_text(f"x = 1\n\ndef f():\n    from {name}.helper import y\n    return y\n")
    (pkg / "helper.py").write_text("y = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    return name, pkg


@pytest.fixture
def setup(tmp_path, probe_package):
    src = tmp_path / "input.txt"
    src.write_text("v1")
    name, pkg = probe_package
    code = pkg / "code.py"
    out = tmp_path / "output.txt"
    work = Work(out)
    runner = StepRunner(tmp_path / "stamps", announce=lambda _m: None)

    def step(**changes) -> Step:
        fields = dict(name="build", run=work, inputs=[src], settings={"block": 32}, outputs=[out], code=[f"{name}.code"])
        fields.update(changes)
        return Step(**fields)

    return runner, step, work, src, out, code


def test_first_run_runs_and_stamps(setup, tmp_path):
    runner, step, work, *_ = setup
    outcome = runner.run(step())
    assert (outcome.name, outcome.skipped, work.runs) == ("build", False, 1)
    assert outcome.result["runs"] == 1
    stamp = json.loads((tmp_path / "stamps" / "build.json").read_text())
    assert stamp["fingerprint"] == runner.fingerprint(step())
    assert stamp["result"] == {"runs": 1, "path": str(tmp_path / "output.txt")}  # made JSON-safe


def test_unchanged_step_is_skipped_and_returns_recorded_result(setup):
    runner, step, work, *_ = setup
    runner.run(step())
    outcome = runner.run(step())
    assert outcome.skipped and work.runs == 1
    assert outcome.result["runs"] == 1


def test_a_new_runner_also_skips(setup, tmp_path):
    runner, step, work, *_ = setup
    runner.run(step())
    assert StepRunner(tmp_path / "stamps", announce=lambda _m: None).run(step()).skipped
    assert work.runs == 1


def test_input_file_change_reruns(setup):
    runner, step, work, src, *_ = setup
    runner.run(step())
    src.write_text("v2 changed")
    assert not runner.run(step()).skipped
    assert work.runs == 2
    assert runner.run(step()).skipped


def test_input_folder_content_change_reruns(setup, tmp_path):
    runner, step, work, *_ = setup
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"1")
    runner.run(step(inputs=[folder]))
    (folder / "weights.bin").write_bytes(b"22")
    assert not runner.run(step(inputs=[folder])).skipped


def test_settings_change_reruns(setup):
    runner, step, work, *_ = setup
    runner.run(step())
    assert not runner.run(step(settings={"block": 64})).skipped
    assert runner.run(step(settings={"block": 64})).skipped
    assert work.runs == 2


def test_code_change_reruns(setup):
    runner, step, work, _src, _out, code = setup
    runner.run(step())
    code.write_text("x = 2  # changed\n")
    assert not runner.run(step()).skipped


def test_code_change_in_an_imported_module_reruns(setup):
    runner, step, work, _src, _out, code = setup
    runner.run(step())
    assert runner.run(step()).skipped
    (code.parent / "helper.py").write_text("y = 2  # changed\n")
    assert not runner.run(step()).skipped


def test_missing_code_module_is_an_error_not_a_constant(setup):
    runner, step, *_ = setup
    with pytest.raises(StepError, match="'scripts.olive_convert', which does not exist"):
        runner.run(step(code=["scripts.olive_convert"]))  # the module's name before the layout change


def test_closure_follows_project_imports_and_worker_strings():
    closure = module_closure(["scripts.runtimes.genai_smoke"])
    assert {"scripts.runtimes.genai_smoke", "scripts.runtimes.backends", "scripts.core.workers", "scripts.core.errors"} <= set(closure)
    assert closure["scripts.runtimes.genai_smoke"] == REPO_ROOT / "scripts" / "runtimes" / "genai_smoke.py"
    kinds = module_closure(["scripts.sources.registry"])  # builders named as "scripts.sources.x:build" strings
    assert {"scripts.sources.demo", "scripts.sources.gguf", "scripts.sources.tiny"} <= set(kinds)


def test_edit_to_a_moved_module_changes_the_step_fingerprint(tmp_path):
    """In a copy of the package: editing scripts/recipe/precisions.py (moved there from scripts/precisions.py and
    imported by the convert step's module only indirectly) changes the convert step's code fingerprint."""
    shutil.copytree(REPO_ROOT / "scripts", tmp_path / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import json, sys; from scripts.core.steps import code_fingerprint; "
            "print(json.dumps(code_fingerprint(['scripts.convert.olive'])))")

    def fingerprint() -> dict:
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
        return json.loads(proc.stdout)

    before = fingerprint()
    assert "scripts.recipe.precisions" in before
    with (tmp_path / "scripts" / "recipe" / "precisions.py").open("a") as f:
        f.write("\n# an edit\n")
    after = fingerprint()
    assert after["scripts.recipe.precisions"] != before["scripts.recipe.precisions"]
    assert {k: v for k, v in after.items() if k != "scripts.recipe.precisions"} == \
        {k: v for k, v in before.items() if k != "scripts.recipe.precisions"}
    assert code_fingerprint(["scripts.convert.olive"]) == before  # the real tree is untouched


def test_deleted_output_reruns(setup):
    runner, step, work, _src, out, _code = setup
    runner.run(step())
    out.unlink()
    outcome = runner.run(step())
    assert not outcome.skipped and work.runs == 2
    assert out.read_text() == "run 2"


def test_force_reruns(setup, tmp_path):
    runner, step, work, *_ = setup
    runner.run(step())
    forced = StepRunner(tmp_path / "stamps", force=True, announce=lambda _m: None)
    assert not forced.run(step()).skipped
    assert not forced.run(step()).skipped
    assert work.runs == 3


def test_failing_step_writes_no_stamp_and_reruns(setup, tmp_path):
    runner, step, work, *_ = setup
    work.fail = True
    with pytest.raises(RuntimeError, match="step failed"):
        runner.run(step())
    assert not (tmp_path / "stamps" / "build.json").exists()
    work.fail = False
    assert not runner.run(step()).skipped
    assert work.runs == 2


def test_failure_after_success_keeps_old_stamp_but_changed_input_still_reruns(setup, tmp_path):
    runner, step, work, src, *_ = setup
    runner.run(step())
    stamp_before = (tmp_path / "stamps" / "build.json").read_text()
    src.write_text("v2 changed")
    work.fail = True
    with pytest.raises(RuntimeError):
        runner.run(step())
    assert (tmp_path / "stamps" / "build.json").read_text() == stamp_before
    work.fail = False
    assert not runner.run(step()).skipped


def test_no_stamp_exists_while_a_step_runs(setup, tmp_path):
    """A run killed after replacing its outputs (tests/test_reliability.py) must leave no stamp vouching for them."""
    runner, step, work, *_ = setup
    runner.run(step())
    stamp = tmp_path / "stamps" / "build.json"
    seen = []
    runner.force = True
    runner.run(step(run=lambda: seen.append(stamp.exists())))
    assert seen == [False] and stamp.is_file()


def test_corrupt_stamp_reruns(setup, tmp_path):
    runner, step, work, *_ = setup
    runner.run(step())
    (tmp_path / "stamps" / "build.json").write_text("{half")
    assert not runner.run(step()).skipped


def test_invalidate(setup, tmp_path):
    runner, step, work, *_ = setup
    runner.run(step())
    runner.invalidate("build")
    assert not (tmp_path / "stamps" / "build.json").exists()
    assert not runner.run(step()).skipped
    runner.invalidate("never-ran")  # no error


def test_unserialisable_result_is_recorded_as_null(setup, tmp_path):
    runner, step, *_ = setup
    circular: list = []
    circular.append(circular)
    runner.run(step(run=lambda: circular, outputs=[]))
    assert json.loads((tmp_path / "stamps" / "build.json").read_text())["result"] is None


def test_announcements(setup, tmp_path):
    _runner, step, *_ = setup
    seen: list[str] = []
    runner = StepRunner(tmp_path / "stamps", announce=seen.append)
    runner.run(step())
    runner.run(step())
    assert seen[0] == "▶ build" and seen[1].startswith("✓ build (")
    assert seen[2] == "• build: skipped (inputs unchanged)"
