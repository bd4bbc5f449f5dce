"""Tests for scripts/doctor.py: the pure evaluate() on hand-made facts, read_pins, and a real run."""
from __future__ import annotations

import io
import re
import sys
from dataclasses import replace

import pytest
from rich.console import Console

from scripts import doctor
from scripts.doctor import Check, DiskFact, Facts, SdkProbe, Status, evaluate, read_pins, run_doctor
from scripts.core.errors import EnvironmentCheckError

GIB = 1024**3

PINS = {
    "olive-ai": "0.13.0",
    "onnxruntime": "1.31.0",
    "onnxruntime-genai": "0.14.1",
    "onnxruntime-genai-core": "0.18.0",
    "transformers": "5.23.0",
    "torch": "2.13.0",
    "requests": "2.34.2",
    "foundry-local-sdk": "2.2.1",
    "jinja2": "3.1.6",
}


def good_facts(**changes) -> Facts:
    """A healthy Linux machine matching PINS; override fields with keyword arguments."""
    facts = Facts(
        python_version="3.11.7",
        platform="linux",
        ram_available_bytes=20 * GIB,
        ram_total_bytes=24 * GIB,
        disks=(DiskFact("build dir", "/tmp/build", 50 * GIB), DiskFact("Foundry cache", "/tmp/c", 50 * GIB)),
        cmake_version="3.31.6",
        foundry_cli_path=None,
        packages={**PINS, "torch": "2.13.0+cpu"},
        sdk_probe=SdkProbe(imported=True, sdk_version="2.2.1", native_loaded=True, native_version="2.2.1"),
    )
    return replace(facts, **changes)


def with_packages(**versions) -> Facts:
    """good_facts() with some package versions changed (keyword names use _ for -; None = not installed)."""
    packages = dict(good_facts().packages)
    for name, version in versions.items():
        packages[name.replace("_", "-")] = version
    return good_facts(packages=packages)


def row(checks: list[Check], name: str) -> Check:
    matches = [c for c in checks if c.name == name]
    assert len(matches) == 1, f"expected one row {name!r}, got {[c.name for c in checks]}"
    return matches[0]


# ---------------------------------------------------------------- evaluate()


def test_good_facts_are_all_ok_or_info():
    checks = evaluate(good_facts(), PINS)
    bad = [c for c in checks if c.status not in (Status.OK, Status.INFO)]
    assert bad == []
    assert {c.name for c in checks} >= set(doctor.REQUIRED_PACKAGES)
    # the local label of a CPU torch wheel is not a mismatch
    assert row(checks, "torch").status is Status.OK
    cli = row(checks, "foundry CLI")
    assert cli.status is Status.INFO and "SDK runtime is used" in cli.found


def test_genai_0_15_is_known_bad_with_explanation_and_pin_fix():
    checks = evaluate(with_packages(onnxruntime_genai="0.15.2"), PINS)
    genai = row(checks, "onnxruntime-genai")
    assert genai.status is Status.FAIL
    assert "Hugging Face details not found in extra_options" in genai.fix
    assert "0.14.1" in genai.fix  # the pin comes from the pins, not from a second list
    assert doctor.failures(checks) == [genai]


@pytest.mark.parametrize("version", ["0.16.0", "0.18.0"])
def test_genai_0_16_to_0_18_is_known_bad(version):
    genai = row(evaluate(with_packages(onnxruntime_genai=version), PINS), "onnxruntime-genai")
    assert genai.status is Status.FAIL
    assert "quantized_model" in genai.fix


def test_genai_known_bad_only_with_olive_0_13():
    checks = evaluate(with_packages(onnxruntime_genai="0.15.2", olive_ai="0.14.0"), PINS)
    assert row(checks, "onnxruntime-genai").status is Status.WARN  # differs from pin, not known bad


def test_untested_version_is_warn_with_pip_fix():
    t = row(evaluate(with_packages(transformers="5.22.0"), PINS), "transformers")
    assert t.status is Status.WARN
    assert "pip install -r requirements.txt" in t.fix and "5.23.0" in t.fix


def test_missing_package_fails_with_pip_fix():
    checks = evaluate(with_packages(transformers=None), PINS)
    t = row(checks, "transformers")
    assert t.status is Status.FAIL
    assert t.found == "not installed"
    assert "pip install -r requirements.txt" in t.fix


def test_missing_requests_explains_olive_needs_it():
    r = row(evaluate(with_packages(requests=None), PINS), "requests")
    assert r.status is Status.FAIL
    assert "olive-ai" in r.fix and "pip install" in r.fix


def test_missing_other_pinned_package_fails():
    other = row(evaluate(with_packages(jinja2=None), PINS), "other pinned packages")
    assert other.status is Status.FAIL
    assert "jinja2" in other.found


def test_low_ram_warns():
    checks = evaluate(good_facts(ram_available_bytes=3 * GIB), PINS)
    ram = row(checks, "RAM")
    assert ram.status is Status.WARN
    assert doctor.failures(checks) == []


def test_low_disk_warns():
    facts = good_facts(disks=(DiskFact("build dir", "/tmp/build", 1 * GIB),))
    disk = row(evaluate(facts, PINS), "Disk free (build dir)")
    assert disk.status is Status.WARN
    assert "SLMOPS_BUILD_DIR" in disk.fix


@pytest.mark.parametrize("cmake", ["3.25.1", None])
def test_old_or_missing_cmake_is_warn_not_fail(cmake):
    checks = evaluate(good_facts(cmake_version=cmake), PINS)
    c = row(checks, "CMake")
    assert c.status is Status.WARN
    assert "from-source build" in c.fix
    assert doctor.failures(checks) == []


def test_other_python_warns():
    assert row(evaluate(good_facts(python_version="3.12.1"), PINS), "Python").status is Status.WARN


def test_sdk_native_library_failure_fails():
    probe = SdkProbe(imported=True, sdk_version="2.2.1", native_loaded=False,
                     error="OSError: libonnxruntime.so.1: cannot open shared object file")
    sdk = row(evaluate(good_facts(sdk_probe=probe), PINS), "Foundry Local runtime (SDK)")
    assert sdk.status is Status.FAIL
    assert "cannot open shared object" in sdk.found
    assert "onnxruntime==1.31.0" in sdk.fix


def test_sdk_not_importable_fails():
    probe = SdkProbe(imported=False, error="ModuleNotFoundError: No module named 'foundry_local_sdk'")
    sdk = row(evaluate(good_facts(sdk_probe=probe), PINS), "Foundry Local runtime (SDK)")
    assert sdk.status is Status.FAIL and "pip install" in sdk.fix


def test_foundry_cli_found_is_ok():
    cli = row(evaluate(good_facts(foundry_cli_path="/usr/bin/foundry"), PINS), "foundry CLI")
    assert cli.status is Status.OK and cli.found == "/usr/bin/foundry"


def test_render_table_has_one_row_per_check():
    checks = evaluate(with_packages(onnxruntime_genai="0.15.2"), PINS)
    table = doctor.render_table(checks)
    assert [c.header for c in table.columns] == ["Check", "Verdict", "Found"]
    assert table.row_count == len(checks)
    out = io.StringIO()
    Console(file=out, width=250).print(table)
    assert "FAIL" in out.getvalue() and "onnxruntime-genai" in out.getvalue()


def _report(checks, width):
    out = io.StringIO()
    doctor.print_report(Console(file=out, width=width), checks)
    return out.getvalue()


def _worst_machine():
    """Every kind of row at its longest: warnings, failures, a long path, a long list of differing packages."""
    facts = with_packages(onnxruntime_genai="0.15.2", transformers=None, jinja2="3.0.0", llama_cpp_python="0.3.20")
    return replace(facts, python_version="3.12.1", ram_available_bytes=2 * GIB, cmake_version=None,
                   disks=(DiskFact("build dir", "/home/someone/projects/slmops-deploy/build/with/a/long/path", GIB),
                          DiskFact("Foundry cache", "/tmp/c", None)))


@pytest.mark.parametrize("width", [80, 100, 160])
def test_the_report_is_readable_at_any_width(width):
    """At most two lines per check in the table, no line wider than the console, nothing cut or elided; what the
    table leaves out (expected, fix, a long Found) is under it, whole."""
    from rich.cells import cell_len

    for checks in (evaluate(good_facts(), PINS, peer_pin="0.3.36"),
                   evaluate(_worst_machine(), PINS, peer_pin="0.3.36")):
        text = _report(checks, width)
        lines = text.splitlines()
        assert all(cell_len(line) <= width for line in lines), max(lines, key=cell_len)
        assert "…" not in text
        body = lines[lines.index(next(ln for ln in lines if ln.startswith("┡"))) + 1:
                     lines.index(next(ln for ln in lines if ln.startswith("└")))]
        assert len(body) <= 2 * len(checks)
        assert lines[lines.index(next(ln for ln in lines if ln.startswith("└")))].endswith("┘")
        flat = " ".join(text.split())
        for c in checks:
            assert c.name.split()[0] in flat
            for part in (c.fix, c.expected if c.status is not Status.OK else ""):
                assert " ".join(part.split()) in flat, part


def test_at_80_columns_the_real_layout_is_two_lines_per_check_at_most():
    checks = evaluate(_worst_machine(), PINS, peer_pin="0.3.36")
    assert "(see below)" in _report(checks, 80)
    notes = dict(doctor.render_notes(checks, 80))
    assert "/with/a/long/path" in notes["Disk free (build dir): WARN"], "a Found too long for two lines is a note"
    assert "Python: WARN" in notes and "Expected 3.11.x (tested)." in notes["Python: WARN"]


# ---------------------------------------------------------------- read_pins()


def test_read_pins_parses_real_requirements():
    pins = read_pins(doctor.REQUIREMENTS_PATH)
    lines = [ln for ln in doctor.REQUIREMENTS_PATH.read_text().splitlines() if ln.strip()
             and not ln.lstrip().startswith("#")]
    assert len(pins) == len(lines)
    assert pins["olive-ai"] == "0.13.0"
    assert pins["onnxruntime-genai"] == "0.14.1"
    assert pins["huggingface-hub"] == "2.4.0"  # huggingface_hub, normalised
    assert pins["jinja2"] == "3.1.6"  # Jinja2, normalised
    for name in doctor.REQUIRED_PACKAGES:
        assert name in pins, f"{name} is not pinned in requirements.txt"


def test_read_pins_handles_comments_extras_markers_and_options(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text(
        "# a comment\n"
        "\n"
        "--index-url https://example.invalid/simple\n"
        "-r other.txt\n"
        "Foo_Bar.Baz==1.2.3  # inline comment\n"
        "uvicorn[standard]==0.30.1\n"
        "colorama==0.4.6 ; sys_platform == 'win32'\n"
        "numpy>=2,<3\n"
        "hashed==1.0 \\\n"
        "    --hash=sha256:0123456789abcdef\n"
        "bare\n"
    )
    assert read_pins(req) == {
        "foo-bar-baz": "1.2.3",
        "uvicorn": "0.30.1",
        "colorama": "0.4.6",
        "numpy": "<3,>=2",
        "hashed": "1.0",
        "bare": "",
    }


def test_read_pins_rejects_garbage_with_line_number(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("ok==1.0\nthis is == not valid\n")
    with pytest.raises(EnvironmentCheckError, match=r"requirements.txt:2"):
        read_pins(req)


def test_read_pins_missing_file(tmp_path):
    with pytest.raises(EnvironmentCheckError, match="cannot read"):
        read_pins(tmp_path / "nope.txt")


def test_specifier_pin_is_honoured():
    pins = {**PINS, "transformers": ">=5,<6"}
    assert row(evaluate(good_facts(), pins), "transformers").status is Status.OK
    assert row(evaluate(with_packages(transformers="4.57.0"), pins), "transformers").status is Status.WARN


# ---------------------------------------------------------------- run_doctor() / gather_facts()


def test_run_doctor_really_runs_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMOPS_BUILD_DIR", str(tmp_path / "build"))
    monkeypatch.setenv("SLMOPS_FOUNDRY_CACHE", str(tmp_path / "cache"))
    out = io.StringIO()
    checks = run_doctor(Console(file=out, width=250))
    names = [c.name for c in checks]
    for name in doctor.REQUIRED_PACKAGES:
        assert name in names
    for name in ("Python", "RAM", "CMake", "foundry CLI", "Foundry Local runtime (SDK)"):
        assert name in names
    assert row(checks, "foundry-local-sdk").found != "not installed"
    sdk = row(checks, "Foundry Local runtime (SDK)")
    assert sdk.status is Status.OK
    assert re.search(r"native library \d+\.\d+", sdk.found), sdk.found  # the library reported its version
    assert "onnxruntime-genai" in out.getvalue()
    narrow = io.StringIO()
    doctor.print_report(Console(file=narrow, width=80), checks)
    table_lines = narrow.getvalue().split("┡", 1)[1].split("└", 1)[0].splitlines()[1:]
    assert len(table_lines) <= 2 * len(checks), narrow.getvalue()
    # the native Foundry library was loaded in a child process, never in this one
    assert "foundry_local_sdk._native.api" not in sys.modules


def test_probe_reports_a_child_that_cannot_start():
    probe = doctor.probe_foundry_sdk(python=sys.executable + "-does-not-exist")
    assert not probe.imported and "could not start" in probe.error


def test_run_doctor_raises_listing_failed_rows_with_fixes(monkeypatch):
    bad = with_packages(onnxruntime_genai="0.15.2", transformers=None)
    monkeypatch.setattr(doctor, "gather_facts", lambda **_: bad)
    monkeypatch.setattr(doctor, "read_pins", lambda _path: PINS)
    out = io.StringIO()
    with pytest.raises(EnvironmentCheckError) as info:
        run_doctor(Console(file=out, width=250))
    message = str(info.value)
    assert "2 environment check(s) failed" in message
    assert "onnxruntime-genai" in message and "Hugging Face details" in message
    assert "transformers" in message and "pip install -r requirements.txt" in message
    assert "FAIL" in out.getvalue()  # the table is printed before raising
    assert len(info.value.checks) == len(evaluate(bad, PINS))


# ---------------------------------------------------------------- the optional llama.cpp peer

PEER_ROW = "llama.cpp peer (llama-cpp-python)"


def test_peer_not_installed_is_info_with_how_to_get_it():
    r = row(evaluate(good_facts(), PINS, peer_pin="0.3.36"), PEER_ROW)
    assert r.status is Status.INFO and r.found == "not installed"
    assert "0.3.36" in r.expected and "optional" in r.expected
    assert "pip install -r requirements-peer.txt" in r.fix and "--peer llama.cpp" in r.fix
    assert "12 minutes" in r.fix, "a user must know the install compiles for a while"


def test_peer_installed_at_the_pin_is_ok_and_another_version_warns():
    assert row(evaluate(with_packages(llama_cpp_python="0.3.36"), PINS, peer_pin="0.3.36"), PEER_ROW).status is Status.OK
    other = row(evaluate(with_packages(llama_cpp_python="0.3.20"), PINS, peer_pin="0.3.36"), PEER_ROW)
    assert other.status is Status.WARN and "requirements-peer.txt" in other.fix


def test_peer_row_never_fails_the_doctor():
    checks = evaluate(good_facts(), PINS, peer_pin="0.3.36")
    assert doctor.failures(checks) == []


def test_run_doctor_shows_the_peer_row_with_the_repository_pin(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "gather_facts", lambda **_: good_facts())
    monkeypatch.setattr(doctor, "read_pins", lambda _path: PINS)
    checks = run_doctor(Console(file=io.StringIO(), width=250))
    from scripts.peers.llamacpp import pinned_version
    assert pinned_version() and pinned_version() in row(checks, PEER_ROW).expected
