"""Tests for scripts/peers/llamacpp.py: the optional peer's pin, its detection, and the "not installed" message.
These run everywhere (CI does not install llama-cpp-python)."""
from __future__ import annotations

import pytest

from scripts.core.errors import MeasurementError, PeerUnavailableError
from scripts.peers import llamacpp
from scripts.peers.llamacpp import peer_status, pinned_version, require_installed


def test_the_repository_pins_the_peer():
    assert pinned_version() == "0.3.36"
    assert llamacpp.requirements_path().name == "requirements-peer.txt"


def test_pin_reading(tmp_path):
    f = tmp_path / "req.txt"
    f.write_text("# comment\ndiskcache==5.6.3\nllama_cpp_python == 0.3.1  # x\n")
    assert pinned_version(f) == "0.3.1"
    f.write_text("diskcache==5.6.3\n")
    assert pinned_version(f) is None
    assert pinned_version(tmp_path / "missing.txt") is None


def test_not_installed_is_a_clear_typed_error(monkeypatch):
    monkeypatch.setattr(llamacpp, "installed_version", lambda: None)
    with pytest.raises(PeerUnavailableError) as info:
        require_installed()
    message = str(info.value)
    assert "llama-cpp-python" in message and "not installed" in message
    assert 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install -r requirements-peer.txt' in message
    assert "0.3.36" in message and "invoke doctor" in message
    assert isinstance(info.value, MeasurementError), "bench callers handle it like any measurement error"


def test_installed_version_is_returned(monkeypatch):
    monkeypatch.setattr(llamacpp, "installed_version", lambda: "0.3.36")
    monkeypatch.setattr(llamacpp, "missing_companions", lambda: [])
    assert require_installed() == "0.3.36"


def test_a_missing_companion_package_is_named(monkeypatch):
    monkeypatch.setattr(llamacpp, "installed_version", lambda: "0.3.36")
    monkeypatch.setattr(llamacpp, "missing_companions", lambda: ["sentencepiece"])
    with pytest.raises(PeerUnavailableError, match=r"also needs sentencepiece .*pip install -r requirements-peer.txt"):
        require_installed()


def test_status_rows():
    missing = peer_status(None, "0.3.36")
    assert not missing.installed and "requirements-peer.txt" in missing.fix
    ok = peer_status("0.3.36", "0.3.36")
    assert ok.installed and ok.matches_pin and ok.fix == ""
    other = peer_status("0.3.2", "0.3.36")
    assert other.installed and not other.matches_pin
